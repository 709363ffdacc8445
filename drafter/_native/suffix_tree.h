// SuffixTreeCore: a frequency-counted, depth-limited, path-compressed suffix tree over many
// token sequences. It stores the same counts as drafter/reference.py's uncompressed trie and
// drafts exactly the same tokens, probabilities and scores.
//
// Strings and counts. The tree holds every substring of length 1..max_depth of every live
// sequence; a string's count is its number of occurrences. An edge spells one or more tokens
// and every position on it has the same count, so a count change always falls on a node
// boundary. Edges copy no tokens: a node references an occurrence of its whole path string in a
// stored sequence. A removed sequence's tokens stay stored while some node references them.
//
// Active suffixes. For each live sequence the nodes of its suffixes of length 0..max_depth-1
// are kept. Each ends exactly on a node boundary: its occurrence at the end of the sequence is
// followed by nothing, so its count exceeds the sum of its children's. Appending a token does
// O(1) work per active suffix (lengthen a leaf, add a leaf, slide a boundary down one token,
// or step into a child, splitting its edge): O(max_depth) per token, no rebuild.
//
// Compression. A non-root node with exactly one child has a larger count than that child
// (otherwise the two would be one edge). No node ends below depth max_depth.
//
// Children. A sibling list per node; a node with more than kIndexAbove children also has them
// in the shared ChildIndex hash map, and (except the root) a Leaders record of its first
// children in drafting order, so that neither lookups nor drafts scan thousands of children.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "child_index.h"

namespace drafter {

inline constexpr int32_t kNone = -1;

// 40 bytes. Ids are int32 indices into a chunked pool; kNone is "no node". The fields a child
// lookup reads come first, so they share a cache line.
struct Node {
  // First token of the edge, == sequence[ref_seq][ref_pos] (cached for child lookups).
  int32_t token;
  // Children form a doubly linked sibling list starting at the parent's first_child
  // (unordered). next_sibling also links the free list.
  int32_t next_sibling;
  // Occurrences of every string ending on this edge (one count for the whole edge). >= 1 for a
  // node in the tree, >= the sum of its children's counts; 0 for the root and for free nodes.
  int32_t count;
  int32_t first_child;
  // Children are also in the shared ChildIndex, keyed (this node, first token). Set once the
  // fan-out exceeds kIndexAbove; stays set until the node is freed.
  uint32_t indexed : 1;
  // Tokens on the edge (>= 1; 0 for the root). Depth of the lower end = sum of len on the path.
  uint32_t len : 31;
  // The sequence slot and index of an occurrence of this node's edge, preceded in that
  // sequence by the rest of the path string (so the edge can also be extended upward).
  int32_t ref_seq;
  int32_t ref_pos;
  // Drafting cache. Not indexed: the child of largest count (ties: smallest token), or kNone
  // when unknown (recomputed on demand); kept exact on every change but a decrement of that
  // child. Indexed: the node's Leaders record in leaders_ (kNone for the root, which is never
  // drafted from).
  int32_t best;
  // The node above; kNone for the root and for free nodes.
  int32_t parent;
  int32_t prev_sibling;
};

// A stored sequence. Its slot survives removal while some node still references its tokens.
struct Sequence {
  std::vector<int32_t> tokens;
  // Live sequences only: active[k] is the node whose path is the last k tokens (k < max_depth).
  std::vector<int32_t> active;
  int64_t id = 0;
  int32_t refs = 0;  // nodes whose ref_seq is this slot
  bool live = false;
};

// The first children of an indexed node in drafting order (count descending, token
// ascending), so that drafting below a node with thousands of children needs no scan.
// While valid, child[0..size) is exactly the first min(kSize, fan-out) children in that order:
// increments and new children keep it exact; a decrement or removal of a member of a full
// record makes it invalid until the next drafting call rebuilds it with one scan.
struct Leaders {
  static constexpr int kSize = 32;
  int32_t size = 0;
  bool valid = false;
  int32_t child[kSize];
};

// The draft of one speculate call; buffers are reused between calls.
struct DraftResult {
  std::vector<int32_t> token_ids;
  std::vector<int32_t> parents;
  std::vector<double> probs;
  double score = 0.0;
  int32_t match_len = 0;
};

class SuffixTreeCore {
 public:
  explicit SuffixTreeCore(int32_t max_depth);
  SuffixTreeCore(const SuffixTreeCore&) = delete;
  SuffixTreeCore& operator=(const SuffixTreeCore&) = delete;

  void extend(int64_t seq_id, const int32_t* tokens, size_t n);
  void remove(int64_t seq_id);  // the sequence must exist

  bool contains(int64_t seq_id) const { return slot_of_.count(seq_id) != 0; }
  size_t num_sequences() const { return slot_of_.size(); }
  int64_t num_tokens() const { return num_tokens_; }
  int64_t num_nodes() const { return num_nodes_; }  // the root excluded
  size_t memory_bytes() const;

  int64_t count(const int32_t* tokens, size_t n) const;

  // The returned reference is valid until the next call.
  const DraftResult& speculate(const int32_t* context, size_t n, int64_t max_tokens,
                               double min_prob, bool tree);

  // A live sequence's slot, its handle for the calls below while it stays live; kNone if
  // seq_id is not live.
  int32_t live_slot(int64_t seq_id) const;

  // The last min(n, length) tokens of the live sequence in `slot`.
  std::pair<const int32_t*, size_t> tail(int32_t slot, size_t n) const;

  // speculate(tail(slot, n)), without walking the context from the root: the live sequence's
  // active suffixes are the nodes of the context's suffixes.
  const DraftResult& speculate_tail(int32_t slot, size_t n, int64_t max_tokens,
                                    double min_prob, bool tree);

  // count(the last m tokens of the live sequence in `slot`, then token), from its active
  // suffixes; m < max_depth and m <= the sequence's length.
  int64_t count_tail_then(int32_t slot, int32_t m, int32_t token) const;

  // Suffix decoding's rule (ArcticInference): every context suffix of length m = 1, 2, ...
  // that occurs in the tree drafts at most min(max_tokens, floor(spec_factor * m +
  // spec_offset)) tokens (and no deeper than max_depth); the best-scoring of those drafts is
  // returned, the longer match on a tie. Valid until the next call.
  const DraftResult& speculate_capped(const int32_t* context, size_t n, int64_t max_tokens,
                                      double min_prob, bool tree, double spec_factor,
                                      double spec_offset);

  // "" when every invariant holds, else a description of the first violation found.
  std::string check_integrity() const;

 private:
  // A point in the tree: `offset` tokens (1..len) into node's edge; depth of that point.
  struct Position {
    int32_t node;
    int32_t offset;
    int32_t depth;
  };
  // A tree-mode draft candidate; the heap pops the highest prob, ties by push order.
  struct Candidate {
    double prob;
    int64_t order;
    Position pos;
    int32_t parent;  // index in the draft, -1 for a child of the match
  };
  struct ScoredChild {
    int32_t count;
    int32_t token;
    int32_t node;
    double prob;
  };

  static constexpr int kChunkBits = 8;
  static constexpr int32_t kChunkSize = 1 << kChunkBits;
  static constexpr int32_t kRoot = 0;
  // A node's children go into the ChildIndex once it has more than this many.
  static constexpr int kIndexAbove = 8;

  Node& node(int32_t id) { return chunks_[size_t(id) >> kChunkBits][id & (kChunkSize - 1)]; }
  const Node& node(int32_t id) const {
    return chunks_[size_t(id) >> kChunkBits][id & (kChunkSize - 1)];
  }
  int32_t edge_token(const Node& n, int32_t offset) const {
    return seqs_[n.ref_seq].tokens[n.ref_pos + offset];
  }
  // Max-heap order of tree-mode candidates: higher prob first, then earlier push (as heapq on
  // (-prob, counter) in the reference).
  static bool pops_after(const Candidate& a, const Candidate& b) {
    return a.prob < b.prob || (a.prob == b.prob && a.order > b.order);
  }
  // Drafting order of siblings: count descending, then token ascending.
  static bool ranks_before(const Node& a, const Node& b) {
    return a.count > b.count || (a.count == b.count && a.token < b.token);
  }

  // Node pool and sequence slots.
  int32_t new_node(int32_t ref_seq, int32_t ref_pos, int32_t len, int32_t count);
  void free_node(int32_t id);
  void set_ref(int32_t id, int32_t seq, int32_t pos);
  void drop_ref(int32_t seq);
  void release_slot_if_unused(int32_t seq);
  int32_t slot_for(int64_t seq_id);

  // Child lists.
  int32_t find_child(int32_t parent, int32_t token) const;
  void prefetch_child(int32_t parent, int32_t token) const;
  void add_child(int32_t parent, int32_t child);
  void unlink_child(int32_t parent, int32_t child);
  void replace_child(int32_t parent, int32_t old_child, int32_t new_child);
  void drop_first_edge_token(int32_t id);
  void free_chain(int32_t id);
  void note_child_grew(int32_t parent, int32_t child);
  void note_child_shrank(int32_t parent, int32_t child);
  int32_t best_child(int32_t id);

  // Leaders of indexed nodes.
  void make_indexed(int32_t id);
  Leaders* kept_leaders(int32_t id);
  Leaders& valid_leaders(int32_t id);
  void leaders_add(Leaders& l, int32_t child);
  void leaders_bubble_up(Leaders& l, int pos);
  void leaders_bubble_down(Leaders& l, int pos);
  static int leaders_find(const Leaders& l, int32_t child);

  // Updates.
  int32_t append_to_suffix(int32_t n, int32_t seq, int32_t pos, int32_t token);
  void remove_occurrence(const int32_t* tokens, int32_t len);
  void merge_into_only_child(int32_t id);

  // Drafting.
  bool match(const int32_t* tokens, int32_t len, Position* end) const;
  // The context's suffix of length m is in the tree followed by at least one token.
  bool continues(const Position& end) const {
    return end.offset < int32_t(node(end.node).len) || node(end.node).first_child != kNone;
  }
  // speculate's draft of a context of n tokens, whose longest continued suffix is found by
  // probe(m, &end): true, with end set, if the suffix of length m is continued.
  template <class Probe>
  const DraftResult& draft_longest(size_t n, int64_t max_tokens, double min_prob, bool tree,
                                   Probe probe);
  void grow_chain(Position at, int64_t max_tokens, double min_prob);
  void grow_tree(Position at, int64_t max_tokens, double min_prob);
  void push_children(const Position& at, double prob, int32_t index, int64_t room,
                     double min_prob);

  int32_t max_depth_;
  std::vector<std::unique_ptr<Node[]>> chunks_;
  int32_t pool_end_ = 0;        // ids [0, pool_end_) have been handed out at least once
  int32_t free_head_ = kNone;   // free nodes, linked by next_sibling
  int64_t num_nodes_ = 0;
  ChildIndex index_;
  std::vector<Leaders> leaders_;
  std::vector<int32_t> free_leaders_;

  std::vector<Sequence> seqs_;
  std::vector<int32_t> free_slots_;
  std::unordered_map<int64_t, int32_t> slot_of_;  // live sequence id -> slot
  int64_t num_tokens_ = 0;
  int32_t removing_ = kNone;  // slot being removed: its tokens must outlive the walk

  // Scratch, reused by every call.
  DraftResult draft_;
  DraftResult best_;  // speculate_capped: the best draft so far
  std::vector<Candidate> heap_;
  std::vector<ScoredChild> children_;
  std::vector<int32_t> ranked_;
  int64_t pushed_ = 0;  // tree-mode push counter (the heap's tie-break)
  int32_t match_hint_ = 1;  // the last match length: where the next search starts
};

}  // namespace drafter
