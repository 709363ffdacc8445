// SuffixTreeCore::check_integrity: walks the whole tree and recounts every node from the
// stored sequences. For tests; O(tokens * max_depth).
#include <algorithm>
#include <sstream>
#include <unordered_set>

#include "suffix_tree.h"

namespace drafter {

std::string SuffixTreeCore::check_integrity() const {
  std::ostringstream err;
  const size_t pool = size_t(pool_end_);

  // Free list.
  std::vector<char> is_free(pool, 0);
  size_t num_free = 0;
  for (int32_t id = free_head_; id != kNone; id = node(id).next_sibling) {
    if (id < 0 || size_t(id) >= pool || is_free[id]) return "free list is corrupt";
    is_free[id] = 1;
    ++num_free;
  }
  if (num_free + size_t(num_nodes_) + 1 != pool) {
    err << "pool of " << pool << " ids holds " << num_free << " free and " << num_nodes_
        << " live nodes plus the root";
    return err.str();
  }

  // Depth-first walk from the root, with the path string.
  std::vector<int32_t> lower_depth(pool, -1);
  std::vector<int32_t> refs(seqs_.size(), 0);
  std::vector<int32_t> path;
  std::vector<std::pair<int32_t, int32_t>> stack{{kRoot, 0}};  // (node, path length above it)
  std::vector<int32_t> leaders_owner(leaders_.size(), kNone);
  size_t reached = 0;
  size_t indexed_children = 0;
  while (!stack.empty()) {
    auto [id, upper] = stack.back();
    stack.pop_back();
    const Node& n = node(id);
    if (is_free[id]) return "free node " + std::to_string(id) + " is in the tree";
    if (lower_depth[id] != -1) return "node " + std::to_string(id) + " is reached twice";
    ++reached;
    const int32_t lower = upper + int32_t(n.len);
    lower_depth[id] = lower;
    path.resize(size_t(upper));
    if (id != kRoot) {
      if (n.count < 1 || n.len < 1) {
        err << "node " << id << " has count " << n.count << " and edge length " << n.len;
        return err.str();
      }
      if (lower > max_depth_) {
        err << "node " << id << " ends at depth " << lower << " > max_depth";
        return err.str();
      }
      if (n.ref_seq < 0 || size_t(n.ref_seq) >= seqs_.size()) {
        err << "node " << id << " references slot " << n.ref_seq;
        return err.str();
      }
      const std::vector<int32_t>& seq = seqs_[n.ref_seq].tokens;
      if (n.ref_pos < upper || size_t(n.ref_pos) + n.len > seq.size()) {
        err << "node " << id << " references [" << n.ref_pos << ", +" << n.len << ") at depth "
            << upper << " in a sequence of " << seq.size() << " tokens";
        return err.str();
      }
      for (int32_t i = 0; i < upper; ++i)
        if (seq[size_t(n.ref_pos - upper + i)] != path[size_t(i)]) {
          err << "node " << id << ": its reference is not preceded by its path";
          return err.str();
        }
      for (uint32_t i = 0; i < n.len; ++i) path.push_back(seq[n.ref_pos + i]);
      if (n.token != path[size_t(upper)]) {
        err << "node " << id << " caches token " << n.token << " but its edge starts with "
            << path[size_t(upper)];
        return err.str();
      }
      ++refs[size_t(n.ref_seq)];
    } else if (n.parent != kNone || n.len != 0) {
      return "the root has a parent or an edge";
    }

    int64_t children_count = 0;
    int32_t num_children = 0;
    int32_t prev = kNone;
    int32_t best = kNone;
    std::unordered_set<int32_t> tokens;
    for (int32_t c = n.first_child; c != kNone; c = node(c).next_sibling) {
      if (c < 0 || size_t(c) >= pool || ++num_children > num_nodes_)
        return "child list of node " + std::to_string(id) + " is corrupt";
      const Node& child = node(c);
      if (child.parent != id || child.prev_sibling != prev) {
        err << "node " << c << " has parent " << child.parent << " / previous sibling "
            << child.prev_sibling << " but is listed under " << id << " after " << prev;
        return err.str();
      }
      if (!tokens.insert(child.token).second) {
        err << "node " << id << " has two children starting with token " << child.token;
        return err.str();
      }
      if (n.indexed) {
        ++indexed_children;
        if (index_.find(id, child.token) != c) {
          err << "index misses child " << c << " of node " << id;
          return err.str();
        }
      }
      if (best == kNone || ranks_before(child, node(best))) best = c;
      children_count += child.count;
      prev = c;
      stack.emplace_back(c, lower);
    }
    if (!n.indexed && num_children > kIndexAbove) {
      err << "node " << id << " has " << num_children << " children but is not indexed";
      return err.str();
    }
    if (n.indexed && id == kRoot) {
      if (n.best != kNone) return "the root has a leaders record";
    } else if (n.indexed) {
      if (n.best < 0 || size_t(n.best) >= leaders_.size() || leaders_owner[size_t(n.best)] != kNone) {
        err << "indexed node " << id << " has leaders record " << n.best;
        return err.str();
      }
      leaders_owner[size_t(n.best)] = id;
      const Leaders& l = leaders_[size_t(n.best)];
      if (l.valid) {
        std::vector<int32_t> ranked;
        for (int32_t c = n.first_child; c != kNone; c = node(c).next_sibling) ranked.push_back(c);
        std::sort(ranked.begin(), ranked.end(),
                  [this](int32_t a, int32_t b) { return ranks_before(node(a), node(b)); });
        ranked.resize(std::min(ranked.size(), size_t(Leaders::kSize)));
        if (!std::equal(ranked.begin(), ranked.end(), l.child, l.child + l.size)) {
          err << "leaders of node " << id << " are not its first children in drafting order";
          return err.str();
        }
      }
    } else if (n.best != kNone && n.best != best) {
      err << "node " << id << " caches best child " << n.best << " but it is " << best;
      return err.str();
    }
    if (id == kRoot) continue;
    if (children_count > n.count) {
      err << "node " << id << " has count " << n.count << " below its children's sum "
          << children_count;
      return err.str();
    }
    if (num_children == 1 && node(n.first_child).count == n.count) {
      err << "node " << id << " has one child with the same count " << n.count
          << " (not compressed)";
      return err.str();
    }
    if (lower == max_depth_ && num_children > 0)
      return "node " + std::to_string(id) + " at max_depth has children";
  }
  if (reached != size_t(num_nodes_) + 1) {
    err << "the walk reached " << reached << " nodes, the pool holds " << num_nodes_ + 1;
    return err.str();
  }

  // The child index holds exactly the children of indexed nodes.
  std::string index_problem;
  index_.for_each([&](int32_t parent, int32_t token, int32_t child) {
    if (!index_problem.empty()) return;
    if (parent < 0 || size_t(parent) >= pool || lower_depth[parent] == -1 ||
        !node(parent).indexed || child < 0 || size_t(child) >= pool ||
        node(child).parent != parent || node(child).token != token)
      index_problem = "stale index entry (" + std::to_string(parent) + ", " +
                      std::to_string(token) + ") -> " + std::to_string(child);
  });
  if (!index_problem.empty()) return index_problem;
  if (index_.size() != indexed_children) {
    err << "index holds " << index_.size() << " entries for " << indexed_children
        << " children of indexed nodes";
    return err.str();
  }

  size_t owned = 0;
  for (int32_t owner : leaders_owner) owned += owner != kNone;
  if (owned + free_leaders_.size() != leaders_.size()) return "leaders records leak";

  // Sequence slots.
  std::vector<char> slot_free(seqs_.size(), 0);
  for (int32_t s : free_slots_) {
    if (s < 0 || size_t(s) >= seqs_.size() || slot_free[s]) return "free slot list is corrupt";
    slot_free[s] = 1;
  }
  int64_t live_tokens = 0;
  size_t live = 0;
  for (size_t s = 0; s < seqs_.size(); ++s) {
    const Sequence& seq = seqs_[s];
    if (seq.refs != refs[s]) {
      err << "slot " << s << " counts " << seq.refs << " references, the tree holds " << refs[s];
      return err.str();
    }
    if (seq.live) {
      ++live;
      live_tokens += int64_t(seq.tokens.size());
      auto it = slot_of_.find(seq.id);
      if (slot_free[s] || it == slot_of_.end() || it->second != int32_t(s))
        return "live slot " + std::to_string(s) + " is not mapped from its id";
    } else if (bool(slot_free[s]) != (seq.refs == 0)) {
      err << "removed slot " << s << " has " << seq.refs << " references and is "
          << (slot_free[s] ? "" : "not ") << "free";
      return err.str();
    }
  }
  if (live != slot_of_.size()) return "id map and live slots disagree";
  if (live_tokens != num_tokens_) {
    err << "live sequences hold " << live_tokens << " tokens, num_tokens says " << num_tokens_;
    return err.str();
  }

  // Recount: every occurrence of every live sequence must walk to a node boundary, and each
  // node's count must be the number of occurrences whose walk covers it.
  std::vector<int32_t> recount(pool, 0);
  for (const Sequence& seq : seqs_) {
    if (!seq.live) continue;
    const int32_t size = int32_t(seq.tokens.size());
    for (int32_t p = 0; p < size; ++p) {
      const int32_t* s = seq.tokens.data() + p;
      const int32_t len = std::min(max_depth_, size - p);
      int32_t at = kRoot;
      for (int32_t depth = 0; depth < len;) {
        const int32_t c = find_child(at, s[depth]);
        if (c == kNone) {
          err << "sequence " << seq.id << ": the occurrence at " << p << " leaves the tree at depth "
              << depth;
          return err.str();
        }
        const Node& child = node(c);
        if (depth + int32_t(child.len) > len) {
          err << "sequence " << seq.id << ": the occurrence at " << p << " ends inside the edge of "
              << c;
          return err.str();
        }
        for (uint32_t i = 0; i < child.len; ++i)
          if (edge_token(child, int32_t(i)) != s[depth + int32_t(i)]) {
            err << "sequence " << seq.id << ": the occurrence at " << p
                << " leaves the tree inside the edge of " << c;
            return err.str();
          }
        ++recount[size_t(c)];
        depth += int32_t(child.len);
        at = c;
      }
    }
    // Active suffixes: active[k] ends at depth k and spells the last k tokens.
    const size_t want = size_t(std::min(size, max_depth_ - 1)) + 1;
    if (seq.active.size() != want) {
      err << "sequence " << seq.id << " has " << seq.active.size() << " active suffixes, not "
          << want;
      return err.str();
    }
    for (size_t k = 0; k < want; ++k) {
      const int32_t a = seq.active[k];
      bool ok = a >= 0 && size_t(a) < pool && lower_depth[a] == int32_t(k);
      if (ok && k > 0) {
        Position end;
        ok = match(seq.tokens.data() + size - int32_t(k), int32_t(k), &end) && end.node == a &&
             end.offset == int32_t(node(a).len);
      }
      if (!ok) {
        err << "sequence " << seq.id << ": active suffix of length " << k << " is node " << a;
        return err.str();
      }
    }
  }
  for (size_t id = 1; id < pool; ++id)
    if (lower_depth[id] != -1 && recount[id] != node(int32_t(id)).count) {
      err << "node " << id << " counts " << node(int32_t(id)).count << " occurrences, the sequences hold "
          << recount[id];
      return err.str();
    }
  return "";
}

}  // namespace drafter
