#include "batch.h"

namespace drafter {

namespace {

// slot: kNone, or a live sequence of tree that ends with the context.
const DraftResult& draft_one(SuffixTreeCore& tree, int32_t slot, const int32_t* context,
                             size_t n, int64_t max_tokens, const BatchOptions& o) {
  if (o.spec_factor > 0.0)
    return tree.speculate_capped(context, n, max_tokens, o.min_prob, o.tree, o.spec_factor,
                                 o.spec_offset);
  if (slot != kNone) return tree.speculate_tail(slot, n, max_tokens, o.min_prob, o.tree);
  return tree.speculate(context, n, max_tokens, o.min_prob, o.tree);
}

// Where a draft of `shared` came from, by the occurrences of its match followed by its first
// token: kShared if one is in a sequence `siblings` (a subset of shared's) lacks; else
// kSiblings if there are more than in the request's own tree (so some running request other
// than this one holds it), else kOwn.
DraftSource shared_source(const BatchRow& row, const int32_t* context, size_t n,
                          const DraftResult& draft, std::vector<int32_t>* key) {
  if (row.siblings == nullptr) return kShared;
  const int32_t m = draft.match_len, first = draft.token_ids[0];
  int64_t live, stored;
  if (row.shared_slot != kNone) {
    live = row.siblings->count_tail_then(row.siblings_slot, m, first);
    stored = row.shared->count_tail_then(row.shared_slot, m, first);
  } else {
    key->assign(context + n - size_t(m), context + n);
    key->push_back(first);
    live = row.siblings->count(key->data(), key->size());
    stored = row.shared->count(key->data(), key->size());
  }
  if (live < stored) return kShared;
  return live > row.own->count_tail_then(row.own_slot, m, first) ? kSiblings : kOwn;
}

}  // namespace

void speculate_batch(const BatchRow* rows, size_t n, const BatchOptions& options,
                     BatchDrafts* out) {
  out->token_ids.clear();
  out->parents.clear();
  out->probs.clear();
  out->offsets.assign(1, 0);
  out->scores.clear();
  out->match_lens.clear();
  out->sources.clear();
  std::vector<int32_t> key;
  for (size_t i = 0; i < n; ++i) {
    const BatchRow& row = rows[i];
    double score = 0.0;
    int32_t match_len = 0;
    DraftSource source = kNoDraft;
    if (row.max_tokens > 0) {
      const auto [context, len] = row.own->tail(row.own_slot, size_t(options.context_len));
      // Each tree's result lives in that tree's scratch until its next call, so the own
      // draft is still intact when the shared one is made (they are different trees). The
      // fallback is drafted only where the pick is empty, and its result is the new pick.
      const DraftResult& own =
          draft_one(*row.own, row.own_slot, context, len, row.max_tokens, options);
      const DraftResult* pick = &own;
      source = kOwn;
      if (row.shared != nullptr && row.shared != row.own) {
        const DraftResult& shared =
            draft_one(*row.shared, row.shared_slot, context, len, row.max_tokens, options);
        const bool shared_wins =
            options.own_wins_ties ? shared.score > own.score : shared.score >= own.score;
        if (shared_wins) pick = &shared;
      }
      if (pick->token_ids.empty() && row.fallback != nullptr) {
        pick = &draft_one(*row.fallback, kNone, context, len, row.max_tokens, options);
        source = kFallback;
      }
      if (pick->token_ids.empty())
        source = kNoDraft;
      else if (pick != &own && source != kFallback)
        source = shared_source(row, context, len, *pick, &key);
      out->token_ids.insert(out->token_ids.end(), pick->token_ids.begin(), pick->token_ids.end());
      out->parents.insert(out->parents.end(), pick->parents.begin(), pick->parents.end());
      out->probs.insert(out->probs.end(), pick->probs.begin(), pick->probs.end());
      score = pick->score;
      match_len = pick->match_len;
    }
    out->offsets.push_back(out->token_ids.size());
    out->scores.push_back(score);
    out->match_lens.push_back(match_len);
    out->sources.push_back(source);
  }
}

}  // namespace drafter
