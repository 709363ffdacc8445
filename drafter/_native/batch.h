// Drafts for every row of a verify step in one call: the loop the speculation core would
// otherwise run in Python, one row at a time. It touches no Python object, so its caller runs
// it with the GIL released.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "suffix_tree.h"

namespace drafter {

// One row: the request's own tree, whose sequence 0 (in slot own_slot) is the request's prompt
// and output so far (the context is its tail), and the shared tree it also drafts from (its
// group's rollouts and, with live siblings, its running requests' outputs; or suffix
// decoding's global cache). `siblings`, if not null, holds exactly the running requests'
// sequences of `shared`: it is not drafted from, only asked where a draft of `shared` came
// from. shared_slot, if not kNone, is a live sequence of `shared` that ends with the context
// (the request's own output with live siblings; siblings_slot is the same sequence in
// `siblings`): the context's suffixes are then its active suffixes there, not walked from the
// root. `fallback`, if not null, is drafted from only when own and shared both give nothing
// (the stored rollouts of every group, for a request whose group's text has no match).
struct BatchRow {
  SuffixTreeCore* own;
  SuffixTreeCore* shared;
  SuffixTreeCore* siblings;
  SuffixTreeCore* fallback;
  int32_t own_slot;
  int32_t shared_slot;
  int32_t siblings_slot;
  int64_t max_tokens;  // >= 0; 0: no draft
};

// Where a row's draft came from (kNoDraft: it is empty). kOwn: the own tree's draft, or one of
// shared that occurs in running requests only and no more often than in the own tree; kShared:
// shared's, from a sequence not in `siblings` (a stored rollout); kSiblings: shared's, only
// from running requests, and more often than in the own tree (so another request holds it);
// kFallback: the fallback tree's. "Occurs": the draft's match followed by its first token.
enum DraftSource : uint8_t { kNoDraft = 0, kOwn = 1, kShared = 2, kSiblings = 3, kFallback = 4 };

struct BatchOptions {
  int64_t context_len;  // the context is the last context_len tokens of own's sequence 0
  double min_prob;
  bool tree;
  // spec_factor > 0: suffix decoding's rule (SuffixTreeCore::speculate_capped); 0: the
  // longest match, uncapped (SuffixTreeCore::speculate).
  double spec_factor;
  double spec_offset;
  bool own_wins_ties;  // which draft a tie of scores goes to
};

// Row i's draft is token_ids[offsets[i], offsets[i + 1]) (parents and probs likewise),
// with scores[i], match_lens[i] and sources[i].
struct BatchDrafts {
  std::vector<int32_t> token_ids;
  std::vector<int32_t> parents;
  std::vector<double> probs;
  std::vector<size_t> offsets;
  std::vector<double> scores;
  std::vector<int32_t> match_lens;
  std::vector<DraftSource> sources;
};

// Every row's draft: the better-scoring of its own tree's and its shared tree's (each as
// speculate or speculate_capped would draft it alone), or, where both are empty, its fallback
// tree's; so the result equals the per-row calls.
void speculate_batch(const BatchRow* rows, size_t n, const BatchOptions& options,
                     BatchDrafts* out);

}  // namespace drafter
