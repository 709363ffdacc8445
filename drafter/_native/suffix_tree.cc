#include "suffix_tree.h"

#include <algorithm>
#include <cmath>

namespace drafter {

SuffixTreeCore::SuffixTreeCore(int32_t max_depth) : max_depth_(max_depth) {
  new_node(kNone, 0, 0, 0);  // the root, id kRoot
  num_nodes_ = 0;
}

// ---------------------------------------------------------------------------------------------
// Node pool and sequence slots

int32_t SuffixTreeCore::new_node(int32_t ref_seq, int32_t ref_pos, int32_t len, int32_t count) {
  int32_t id;
  if (free_head_ != kNone) {
    id = free_head_;
    free_head_ = node(id).next_sibling;
  } else {
    if ((pool_end_ & (kChunkSize - 1)) == 0) chunks_.push_back(std::make_unique<Node[]>(kChunkSize));
    id = pool_end_++;
  }
  ++num_nodes_;
  Node& n = node(id);
  n.count = count;
  n.parent = n.first_child = n.next_sibling = n.prev_sibling = n.best = kNone;
  n.ref_seq = ref_seq;
  n.ref_pos = ref_pos;
  n.indexed = 0;
  n.len = uint32_t(len);
  n.token = 0;
  if (ref_seq != kNone) {
    ++seqs_[ref_seq].refs;
    n.token = seqs_[ref_seq].tokens[ref_pos];
  }
  return id;
}

// The node must already be out of its parent's child list and have no children left in the
// index.
void SuffixTreeCore::free_node(int32_t id) {
  Node& n = node(id);
  int32_t ref_seq = n.ref_seq;
  if (n.indexed) free_leaders_.push_back(n.best);
  n.count = 0;
  n.parent = n.first_child = n.prev_sibling = n.best = n.ref_seq = kNone;
  n.indexed = 0;
  n.len = 0;
  n.next_sibling = free_head_;
  free_head_ = id;
  --num_nodes_;
  if (ref_seq != kNone) drop_ref(ref_seq);
}

void SuffixTreeCore::set_ref(int32_t id, int32_t seq, int32_t pos) {
  Node& n = node(id);
  n.ref_pos = pos;
  if (n.ref_seq == seq) return;
  int32_t old = n.ref_seq;
  n.ref_seq = seq;
  ++seqs_[seq].refs;
  drop_ref(old);
}

void SuffixTreeCore::drop_ref(int32_t seq) {
  if (--seqs_[seq].refs == 0) release_slot_if_unused(seq);
}

void SuffixTreeCore::release_slot_if_unused(int32_t seq) {
  Sequence& s = seqs_[seq];
  if (s.live || s.refs != 0 || seq == removing_) return;
  std::vector<int32_t>().swap(s.tokens);
  std::vector<int32_t>().swap(s.active);
  s.id = 0;
  free_slots_.push_back(seq);
}

int32_t SuffixTreeCore::slot_for(int64_t seq_id) {
  if (auto it = slot_of_.find(seq_id); it != slot_of_.end()) return it->second;
  if (free_slots_.empty()) {
    seqs_.emplace_back();
    free_slots_.push_back(int32_t(seqs_.size()) - 1);
  }
  const int32_t slot = free_slots_.back();
  slot_of_.emplace(seq_id, slot);
  free_slots_.pop_back();
  Sequence& s = seqs_[size_t(slot)];
  s.id = seq_id;
  s.live = true;
  s.active.assign(1, kRoot);
  return slot;
}

// ---------------------------------------------------------------------------------------------
// Child lists

int32_t SuffixTreeCore::find_child(int32_t parent, int32_t token) const {
  const Node& p = node(parent);
  if (p.indexed) return index_.find(parent, token);
  for (int32_t c = p.first_child; c != kNone;) {
    const Node& n = node(c);
    if (n.token == token) return c;
    c = n.next_sibling;
  }
  return kNone;
}

void SuffixTreeCore::prefetch_child(int32_t parent, int32_t token) const {
  const Node& p = node(parent);
  if (p.indexed)
    index_.prefetch(parent, token);
  else if (p.first_child != kNone)
    __builtin_prefetch(&node(p.first_child));
}

// Links a new child (its token set, its key absent) under parent.
void SuffixTreeCore::add_child(int32_t parent, int32_t child) {
  Node& p = node(parent);
  Node& c = node(child);
  c.parent = parent;
  if (p.indexed) {
    c.prev_sibling = kNone;
    c.next_sibling = p.first_child;
    if (p.first_child != kNone) node(p.first_child).prev_sibling = child;
    p.first_child = child;
    index_.insert(parent, c.token, child);
    if (Leaders* l = kept_leaders(parent)) leaders_add(*l, child);
    return;
  }
  // Append at the tail: the earliest, usually most frequent, children are scanned first.
  int32_t last = kNone;
  int fanout = 0;
  for (int32_t x = p.first_child; x != kNone; x = node(x).next_sibling) {
    last = x;
    ++fanout;
  }
  c.prev_sibling = last;
  c.next_sibling = kNone;
  if (last == kNone) {
    p.first_child = child;
    p.best = child;
  } else {
    node(last).next_sibling = child;
    note_child_grew(parent, child);
  }
  if (fanout + 1 > kIndexAbove) make_indexed(parent);
}

void SuffixTreeCore::make_indexed(int32_t id) {
  Node& n = node(id);
  n.indexed = 1;
  n.best = kNone;
  for (int32_t c = n.first_child; c != kNone; c = node(c).next_sibling)
    index_.insert(id, node(c).token, c);
  if (id == kRoot) return;  // drafting never starts at the root: it keeps no leaders
  int32_t slot;
  if (!free_leaders_.empty()) {
    slot = free_leaders_.back();
    free_leaders_.pop_back();
  } else {
    slot = int32_t(leaders_.size());
    leaders_.emplace_back();
  }
  leaders_[size_t(slot)].valid = false;
  node(id).best = slot;
  valid_leaders(id);  // cheap now (kIndexAbove + 1 children), then kept valid incrementally
}

void SuffixTreeCore::unlink_child(int32_t parent, int32_t child) {
  Node& p = node(parent);
  Node& c = node(child);
  if (c.prev_sibling != kNone)
    node(c.prev_sibling).next_sibling = c.next_sibling;
  else
    p.first_child = c.next_sibling;
  if (c.next_sibling != kNone) node(c.next_sibling).prev_sibling = c.prev_sibling;
  if (p.indexed) {
    index_.erase(parent, c.token);
    Leaders* l = kept_leaders(parent);
    const int i = l ? leaders_find(*l, child) : -1;
    if (i >= 0 && l->size < Leaders::kSize) {
      std::copy(l->child + i + 1, l->child + l->size, l->child + i);  // it held every child
      --l->size;
    } else if (i >= 0) {
      l->valid = false;  // the next child in order is unknown
    }
  } else if (p.best == child) {
    p.best = kNone;
  }
  c.parent = c.prev_sibling = c.next_sibling = kNone;
}

// new_child takes old_child's place under parent. Both have the same first token, and
// new_child's count is at least old_child's.
void SuffixTreeCore::replace_child(int32_t parent, int32_t old_child, int32_t new_child) {
  Node& p = node(parent);
  Node& o = node(old_child);
  Node& n = node(new_child);
  n.parent = parent;
  n.prev_sibling = o.prev_sibling;
  n.next_sibling = o.next_sibling;
  if (o.prev_sibling != kNone)
    node(o.prev_sibling).next_sibling = new_child;
  else
    p.first_child = new_child;
  if (o.next_sibling != kNone) node(o.next_sibling).prev_sibling = new_child;
  o.parent = o.prev_sibling = o.next_sibling = kNone;
  if (p.indexed) {
    index_.assign(parent, o.token, new_child);
    Leaders* l = kept_leaders(parent);
    if (!l) return;
    const int i = leaders_find(*l, old_child);
    if (i >= 0) {
      l->child[i] = new_child;
      leaders_bubble_up(*l, i);
    } else {
      leaders_add(*l, new_child);
    }
  } else if (p.best == old_child) {
    p.best = new_child;
  } else {
    note_child_grew(parent, new_child);
  }
}

// The node's edge loses its first token to the node above (whose only child it is).
void SuffixTreeCore::drop_first_edge_token(int32_t id) {
  Node& n = node(id);
  int32_t old_token = n.token;
  n.ref_pos += 1;
  n.len -= 1;
  n.token = edge_token(n, 0);
  if (node(n.parent).indexed) {
    index_.erase(n.parent, old_token);
    index_.insert(n.parent, n.token, id);
  }
}

// Child's count went up.
void SuffixTreeCore::note_child_grew(int32_t parent, int32_t child) {
  Node& p = node(parent);
  if (p.indexed) {
    Leaders* l = kept_leaders(parent);
    if (!l) return;
    const int i = leaders_find(*l, child);
    if (i >= 0)
      leaders_bubble_up(*l, i);
    else
      leaders_add(*l, child);
  } else if (p.best != kNone && p.best != child && ranks_before(node(child), node(p.best))) {
    p.best = child;
  }
}

// Child's count went down (and is still >= 1).
void SuffixTreeCore::note_child_shrank(int32_t parent, int32_t child) {
  Node& p = node(parent);
  if (p.indexed) {
    Leaders* l = kept_leaders(parent);
    const int i = l ? leaders_find(*l, child) : -1;
    if (i >= 0 && l->size < Leaders::kSize)
      leaders_bubble_down(*l, i);  // it holds every child
    else if (i >= 0)
      l->valid = false;  // a child outside the record may now rank before it
  } else if (p.best == child) {
    p.best = kNone;  // a sibling may rank first now
  }
}

int32_t SuffixTreeCore::best_child(int32_t id) {
  Node& n = node(id);
  if (n.first_child == kNone) return kNone;
  if (n.indexed) return valid_leaders(id).child[0];
  if (n.best == kNone) {
    int32_t best = n.first_child;
    for (int32_t c = node(best).next_sibling; c != kNone; c = node(c).next_sibling)
      if (ranks_before(node(c), node(best))) best = c;
    n.best = best;
  }
  return n.best;
}

// ---------------------------------------------------------------------------------------------
// Leaders of indexed nodes

// The record of an indexed node if it is valid (to be kept exact), else nullptr.
Leaders* SuffixTreeCore::kept_leaders(int32_t id) {
  const Node& n = node(id);
  if (id == kRoot || !n.indexed) return nullptr;
  Leaders& l = leaders_[size_t(n.best)];
  return l.valid ? &l : nullptr;
}

Leaders& SuffixTreeCore::valid_leaders(int32_t id) {
  Leaders& l = leaders_[size_t(node(id).best)];
  if (l.valid) return l;
  ranked_.clear();
  for (int32_t c = node(id).first_child; c != kNone; c = node(c).next_sibling)
    ranked_.push_back(c);
  const size_t size = std::min(ranked_.size(), size_t(Leaders::kSize));
  std::partial_sort(ranked_.begin(), ranked_.begin() + ptrdiff_t(size), ranked_.end(),
                    [this](int32_t a, int32_t b) { return ranks_before(node(a), node(b)); });
  std::copy(ranked_.begin(), ranked_.begin() + ptrdiff_t(size), l.child);
  l.size = int32_t(size);
  l.valid = true;
  return l;
}

// A child that is not in the (valid) record appeared or grew.
void SuffixTreeCore::leaders_add(Leaders& l, int32_t child) {
  if (l.size < Leaders::kSize) {  // the record holds every child
    l.child[l.size] = child;
    leaders_bubble_up(l, l.size++);
  } else if (ranks_before(node(child), node(l.child[Leaders::kSize - 1]))) {
    l.child[Leaders::kSize - 1] = child;
    leaders_bubble_up(l, Leaders::kSize - 1);
  }
}

void SuffixTreeCore::leaders_bubble_up(Leaders& l, int pos) {
  for (; pos > 0 && ranks_before(node(l.child[pos]), node(l.child[pos - 1])); --pos)
    std::swap(l.child[pos], l.child[pos - 1]);
}

void SuffixTreeCore::leaders_bubble_down(Leaders& l, int pos) {
  for (; pos + 1 < l.size && ranks_before(node(l.child[pos + 1]), node(l.child[pos])); ++pos)
    std::swap(l.child[pos], l.child[pos + 1]);
}

int SuffixTreeCore::leaders_find(const Leaders& l, int32_t child) {
  for (int i = 0; i < l.size; ++i)
    if (l.child[i] == child) return i;
  return -1;
}

// ---------------------------------------------------------------------------------------------
// Updates

void SuffixTreeCore::extend(int64_t seq_id, const int32_t* tokens, size_t n) {
  int32_t s = slot_for(seq_id);
  Sequence& seq = seqs_[s];  // no slot is added below, so the reference stays valid
  if (seq.tokens.capacity() < seq.tokens.size() + n)
    seq.tokens.reserve(std::max(seq.tokens.size() + n, seq.tokens.capacity() * 3 / 2));
  for (size_t i = 0; i < n; ++i) {
    const int32_t token = tokens[i];
    const int32_t pos = int32_t(seq.tokens.size());
    seq.tokens.push_back(token);
    std::vector<int32_t>& active = seq.active;
    const int32_t k = int32_t(active.size());  // active suffixes: lengths 0..k-1
    if (k < max_depth_) active.push_back(kNone);
    // Longest first, so active[j + 1] is consumed before it is overwritten.
    for (int32_t j = k - 1; j >= 0; --j) {
      if (j > 0) prefetch_child(active[j - 1], token);  // overlap the next lookup's miss
      int32_t grown = append_to_suffix(active[j], s, pos, token);
      if (j + 1 < max_depth_) active[j + 1] = grown;
    }
  }
  num_tokens_ += int64_t(n);
}

// The suffix whose path ends at node `id` (at position pos of sequence seq, exclusive) gains
// `token` (already stored at pos). Returns the node whose path is the grown suffix. O(1) but
// for one child lookup.
int32_t SuffixTreeCore::append_to_suffix(int32_t id, int32_t seq, int32_t pos, int32_t token) {
  if (id != kRoot) {
    Node& n = node(id);
    if (n.count == 1) {
      // Its only occurrence is this suffix (so it is a leaf): lengthen the edge.
      set_ref(id, seq, pos - int32_t(n.len));
      n.len += 1;
      return id;
    }
  }
  const int32_t c = find_child(id, token);
  if (c == kNone) {
    int32_t leaf = new_node(seq, pos, 1, 1);
    add_child(id, leaf);
    if (id != kRoot) set_ref(id, seq, pos - int32_t(node(id).len));
    return leaf;
  }
  Node& n = node(id);
  Node& child = node(c);
  if (id != kRoot && n.count == child.count + 1) {
    // This suffix is the only occurrence that ends at n (so c is n's only child), and the new
    // occurrence makes n's path + token as frequent as n's path: the boundary slides down.
    if (child.len == 1) {
      // Fuse: c absorbs n's edge and takes its place (active suffixes may point at c).
      child.count += 1;
      child.len = n.len + 1;
      set_ref(c, seq, pos + 1 - int32_t(child.len));
      child.token = n.token;
      if (n.indexed) index_.erase(id, token);
      replace_child(n.parent, id, c);
      n.first_child = kNone;
      free_node(id);
      return c;
    }
    n.len += 1;
    set_ref(id, seq, pos + 1 - int32_t(n.len));
    drop_first_edge_token(c);
    return id;
  }
  // Other occurrences also end at or pass through n: the new one moves into c.
  if (id != kRoot) set_ref(id, seq, pos - int32_t(n.len));
  if (child.len == 1) {
    child.count += 1;
    set_ref(c, seq, pos);
    note_child_grew(id, c);
    return c;
  }
  // Split c after its first token; the new upper part holds one more occurrence.
  const int32_t upper = new_node(seq, pos, 1, child.count + 1);
  replace_child(id, c, upper);
  Node& u = node(upper);
  u.first_child = c;
  u.best = c;
  child.parent = upper;
  drop_first_edge_token(c);
  return upper;
}

void SuffixTreeCore::remove(int64_t seq_id) {
  auto it = slot_of_.find(seq_id);
  const int32_t s = it->second;
  slot_of_.erase(it);
  Sequence& seq = seqs_[s];
  seq.live = false;
  std::vector<int32_t>().swap(seq.active);
  const int32_t n = int32_t(seq.tokens.size());
  num_tokens_ -= n;
  removing_ = s;
  for (int32_t p = 0; p < n; ++p)
    remove_occurrence(seq.tokens.data() + p, std::min(max_depth_, n - p));
  removing_ = kNone;
  if (seq.refs > 0) seq.tokens.shrink_to_fit();
  release_slot_if_unused(s);
}

// Forgets one occurrence of tokens[0..len), len = min(max_depth, tokens left in its sequence).
void SuffixTreeCore::remove_occurrence(const int32_t* tokens, int32_t len) {
  int32_t last = kRoot;  // the deepest node on the path that survives
  for (int32_t depth = 0; depth < len;) {
    const int32_t c = find_child(last, tokens[depth]);
    Node& child = node(c);
    if (--child.count == 0) {
      // Nothing below counts more than c did (1): c heads a chain that this occurrence alone
      // kept alive.
      unlink_child(last, c);
      free_chain(c);
      break;
    }
    note_child_shrank(last, c);
    depth += int32_t(child.len);
    last = c;
  }
  // Nodes strictly above `last` lost one occurrence, and so did their child on the path, so
  // only `last` can now have a single child as frequent as itself.
  if (last == kRoot) return;
  const Node& n = node(last);
  if (n.first_child == kNone) return;
  const Node& child = node(n.first_child);
  if (child.next_sibling == kNone && child.count == n.count) merge_into_only_child(last);
}

void SuffixTreeCore::free_chain(int32_t id) {
  while (id != kNone) {
    Node& n = node(id);
    const int32_t next = n.first_child;
    if (next != kNone && n.indexed) index_.erase(id, node(next).token);
    free_node(id);
    id = next;
  }
}

// Node `id` has one child as frequent as itself: the child absorbs id's edge (its reference
// is a whole-path occurrence, so it can be extended upward) and takes its place.
void SuffixTreeCore::merge_into_only_child(int32_t id) {
  Node& n = node(id);
  const int32_t c = n.first_child;
  Node& child = node(c);
  if (n.indexed) index_.erase(id, child.token);
  child.ref_pos -= int32_t(n.len);
  child.len += n.len;
  child.token = n.token;
  replace_child(n.parent, id, c);
  n.first_child = kNone;
  free_node(id);
}

// ---------------------------------------------------------------------------------------------
// Queries and drafting

int64_t SuffixTreeCore::count(const int32_t* tokens, size_t n) const {
  if (n == 0 || n > size_t(max_depth_)) return 0;
  Position end;
  return match(tokens, int32_t(n), &end) ? node(end.node).count : 0;
}

// Walks tokens[0..len) (len >= 1) from the root.
bool SuffixTreeCore::match(const int32_t* tokens, int32_t len, Position* end) const {
  int32_t at = kRoot;
  for (int32_t depth = 0;;) {
    const int32_t c = find_child(at, tokens[depth]);
    if (c == kNone) return false;
    const Node& child = node(c);
    const int32_t take = std::min(int32_t(child.len), len - depth);
    if (take > 1) {
      const int32_t* edge = seqs_[child.ref_seq].tokens.data() + child.ref_pos;
      for (int32_t i = 1; i < take; ++i)
        if (edge[i] != tokens[depth + i]) return false;
    }
    depth += take;
    if (depth == len) {
      *end = Position{c, take, depth};
      return true;
    }
    at = c;
  }
}

template <class Probe>
const DraftResult& SuffixTreeCore::draft_longest(size_t n, int64_t max_tokens, double min_prob,
                                                 bool tree, Probe probe) {
  DraftResult& d = draft_;
  d.token_ids.clear();
  d.parents.clear();
  d.probs.clear();
  d.score = 0.0;
  d.match_len = 0;
  if (max_tokens == 0 || n == 0) return d;
  const int64_t limit =
      std::min<int64_t>(int64_t(n), std::max<int64_t>(1, int64_t(max_depth_) - max_tokens));
  // The longest context suffix that occurs followed by at least one token. That is monotone
  // in the length (a shorter suffix occurs wherever a longer one does), so search it: gallop
  // from the previous call's match length (contexts of one tree tend to match alike), then
  // bisect. Any probe order finds the same length.
  int32_t lo = 0;                  // a length known to match (0: none yet)
  int32_t hi = int32_t(limit);     // no longer length matches
  Position at{};
  auto try_length = [&](int32_t m) {
    Position end;
    if (probe(m, &end)) {
      lo = m;
      at = end;
      return true;
    }
    hi = m - 1;
    return false;
  };
  if (try_length(std::clamp(match_hint_, 1, hi))) {
    for (int32_t step = 1; lo < hi && try_length(std::min(lo + step, hi)); step *= 2) {
    }
  } else {
    for (int32_t step = 1; lo < hi && !try_length(std::max(hi + 1 - step, lo + 1)); step *= 2) {
    }
  }
  while (lo < hi) try_length(lo + (hi - lo + 1) / 2);
  if (lo > 0) match_hint_ = lo;
  if (lo == 0) return d;
  d.match_len = lo;
  if (tree)
    grow_tree(at, max_tokens, min_prob);
  else
    grow_chain(at, max_tokens, min_prob);
  for (double p : d.probs) d.score += p;
  return d;
}

const DraftResult& SuffixTreeCore::speculate(const int32_t* context, size_t n,
                                             int64_t max_tokens, double min_prob, bool tree) {
  return draft_longest(n, max_tokens, min_prob, tree, [&](int32_t m, Position* end) {
    return match(context + n - size_t(m), m, end) && continues(*end);
  });
}

int32_t SuffixTreeCore::live_slot(int64_t seq_id) const {
  auto it = slot_of_.find(seq_id);
  return it == slot_of_.end() ? kNone : it->second;
}

std::pair<const int32_t*, size_t> SuffixTreeCore::tail(int32_t slot, size_t n) const {
  const std::vector<int32_t>& tokens = seqs_[size_t(slot)].tokens;
  const size_t take = std::min(n, tokens.size());
  return {tokens.data() + tokens.size() - take, take};
}

const DraftResult& SuffixTreeCore::speculate_tail(int32_t slot, size_t n, int64_t max_tokens,
                                                  double min_prob, bool tree) {
  const Sequence& s = seqs_[size_t(slot)];
  // Lengths up to min(n, max_depth - 1) are probed, all of them active suffixes, each of which
  // ends on a node boundary.
  return draft_longest(std::min(n, s.tokens.size()), max_tokens, min_prob, tree,
                       [&](int32_t m, Position* end) {
                         const int32_t id = s.active[size_t(m)];
                         *end = Position{id, int32_t(node(id).len), m};
                         return node(id).first_child != kNone;
                       });
}

int64_t SuffixTreeCore::count_tail_then(int32_t slot, int32_t m, int32_t token) const {
  // The active suffix ends on a node boundary, so the next token starts a child's edge.
  const int32_t c = find_child(seqs_[size_t(slot)].active[size_t(m)], token);
  return c == kNone ? 0 : node(c).count;
}

const DraftResult& SuffixTreeCore::speculate_capped(const int32_t* context, size_t n,
                                                    int64_t max_tokens, double min_prob,
                                                    bool tree, double spec_factor,
                                                    double spec_offset) {
  DraftResult& d = draft_;
  DraftResult& best = best_;
  best.token_ids.clear();
  best.parents.clear();
  best.probs.clear();
  best.score = 0.0;
  best.match_len = 0;
  // A match at depth max_depth has nothing below it.
  const int32_t longest = int32_t(std::min<int64_t>(int64_t(n), max_depth_ - 1));
  bool found = false;
  for (int32_t m = 1; max_tokens > 0 && m <= longest; ++m) {
    Position at;
    // A suffix occurs wherever a longer one does: the first miss ends the search.
    if (!match(context + n - m, m, &at)) break;
    // The 1e-9 keeps a product that should be whole (1.0 * 3) from rounding down.
    const double cap = std::floor(spec_factor * double(m) + spec_offset + 1e-9);
    const int64_t budget = cap <= 0.0 ? 0 : cap >= double(max_tokens) ? max_tokens : int64_t(cap);
    d.token_ids.clear();
    d.parents.clear();
    d.probs.clear();
    d.score = 0.0;
    d.match_len = m;
    if (budget > 0) {
      if (tree)
        grow_tree(at, budget, min_prob);
      else
        grow_chain(at, budget, min_prob);
    }
    for (double p : d.probs) d.score += p;
    if (!found || d.score >= best.score) {
      std::swap(best, d);
      found = true;
    }
  }
  std::swap(best, d);
  if (d.token_ids.empty()) d.match_len = 0;  // as speculate: no draft, no match
  return d;
}

void SuffixTreeCore::grow_chain(Position at, int64_t max_tokens, double min_prob) {
  DraftResult& d = draft_;
  double prob = 1.0;
  while (int64_t(d.token_ids.size()) < max_tokens && at.depth < max_depth_) {
    const Node& n = node(at.node);
    int32_t token;
    if (at.offset < int32_t(n.len)) {
      // Inside an edge the next token is as frequent as this one: prob is unchanged.
      token = edge_token(n, at.offset);
      at.offset += 1;
    } else {
      const int32_t c = best_child(at.node);
      if (c == kNone) break;
      const Node& child = node(c);
      const double next = prob * (double(child.count) / double(n.count));
      if (next < min_prob) break;
      prob = next;
      token = child.token;
      at.node = c;
      at.offset = 1;
    }
    at.depth += 1;
    d.parents.push_back(int32_t(d.token_ids.size()) - 1);
    d.token_ids.push_back(token);
    d.probs.push_back(prob);
  }
}

void SuffixTreeCore::grow_tree(Position at, int64_t max_tokens, double min_prob) {
  DraftResult& d = draft_;
  heap_.clear();
  pushed_ = 0;
  push_children(at, 1.0, -1, max_tokens, min_prob);
  while (!heap_.empty() && int64_t(d.token_ids.size()) < max_tokens) {
    std::pop_heap(heap_.begin(), heap_.end(), pops_after);
    const Candidate c = heap_.back();
    heap_.pop_back();
    const Node& n = node(c.pos.node);
    d.token_ids.push_back(edge_token(n, c.pos.offset - 1));
    d.parents.push_back(c.parent);
    d.probs.push_back(c.prob);
    const int64_t room = max_tokens - int64_t(d.token_ids.size());
    push_children(c.pos, c.prob, int32_t(d.token_ids.size()) - 1, room, min_prob);
  }
}

// Pushes the continuations of `at` whose probability is at least min_prob, in drafting order
// (count descending, token ascending). Only the first `room` can ever be popped (each pops
// after the ones before it), so the rest are not pushed; the relative push order, and so
// every tie-break, is the same as pushing them all.
void SuffixTreeCore::push_children(const Position& at, double prob, int32_t index, int64_t room,
                                   double min_prob) {
  if (at.depth >= max_depth_ || room <= 0) return;
  const Node& n = node(at.node);
  const size_t first_new = heap_.size();
  if (at.offset < int32_t(n.len)) {
    heap_.push_back(Candidate{prob, pushed_++, {at.node, at.offset + 1, at.depth + 1}, index});
  } else if (n.indexed && room <= Leaders::kSize) {
    const Leaders& l = valid_leaders(at.node);
    for (int i = 0; i < l.size && i < room; ++i) {
      const Node& child = node(l.child[i]);
      const double p = prob * (double(child.count) / double(n.count));
      if (p < min_prob) break;  // the rest rank lower
      heap_.push_back(Candidate{p, pushed_++, {l.child[i], 1, at.depth + 1}, index});
    }
  } else {
    children_.clear();
    for (int32_t c = n.first_child; c != kNone;) {
      const Node& child = node(c);
      const double p = prob * (double(child.count) / double(n.count));
      if (p >= min_prob) children_.push_back(ScoredChild{child.count, child.token, c, p});
      c = child.next_sibling;
    }
    auto by_rank = [](const ScoredChild& a, const ScoredChild& b) {
      return a.count > b.count || (a.count == b.count && a.token < b.token);
    };
    if (int64_t(children_.size()) > room) {
      std::partial_sort(children_.begin(), children_.begin() + room, children_.end(), by_rank);
      children_.resize(size_t(room));
    } else {
      std::sort(children_.begin(), children_.end(), by_rank);
    }
    for (const ScoredChild& c : children_)
      heap_.push_back(Candidate{c.prob, pushed_++, {c.node, 1, at.depth + 1}, index});
  }
  for (size_t i = first_new; i < heap_.size(); ++i)
    std::push_heap(heap_.begin(), heap_.begin() + i + 1, pops_after);
}

// ---------------------------------------------------------------------------------------------
// Accounting and checks

size_t SuffixTreeCore::memory_bytes() const {
  size_t bytes = sizeof(*this);
  bytes += chunks_.capacity() * sizeof(chunks_[0]) + chunks_.size() * kChunkSize * sizeof(Node);
  bytes += index_.memory_bytes();
  bytes += seqs_.capacity() * sizeof(Sequence) + free_slots_.capacity() * sizeof(int32_t);
  for (const Sequence& s : seqs_)
    bytes += (s.tokens.capacity() + s.active.capacity()) * sizeof(int32_t);
  // unordered_map: a bucket array plus one heap node (next pointer, key, value) per entry.
  bytes += slot_of_.bucket_count() * sizeof(void*) +
           slot_of_.size() * (sizeof(void*) + sizeof(std::pair<const int64_t, int32_t>));
  bytes += (draft_.token_ids.capacity() + draft_.parents.capacity()) * sizeof(int32_t) +
           draft_.probs.capacity() * sizeof(double) + heap_.capacity() * sizeof(Candidate) +
           children_.capacity() * sizeof(ScoredChild) + ranked_.capacity() * sizeof(int32_t);
  bytes += leaders_.capacity() * sizeof(Leaders) + free_leaders_.capacity() * sizeof(int32_t);
  return bytes;
}

}  // namespace drafter
