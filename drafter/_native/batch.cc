#include "batch.h"

namespace drafter {

namespace {

const DraftResult& draft_one(SuffixTreeCore& tree, const int32_t* context, size_t n,
                             int64_t max_tokens, const BatchOptions& o) {
  if (o.spec_factor > 0.0)
    return tree.speculate_capped(context, n, max_tokens, o.min_prob, o.tree, o.spec_factor,
                                 o.spec_offset);
  return tree.speculate(context, n, max_tokens, o.min_prob, o.tree);
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
  for (size_t i = 0; i < n; ++i) {
    const BatchRow& row = rows[i];
    double score = 0.0;
    int32_t match_len = 0;
    if (row.max_tokens > 0) {
      const auto [context, len] = row.own->tail(0, size_t(options.context_len));
      // Each tree's result lives in that tree's scratch until its next call, so the own
      // draft is still intact when the shared one is made (they are different trees).
      const DraftResult& own = draft_one(*row.own, context, len, row.max_tokens, options);
      const DraftResult* pick = &own;
      if (row.shared != nullptr && row.shared != row.own) {
        const DraftResult& shared =
            draft_one(*row.shared, context, len, row.max_tokens, options);
        const bool shared_wins =
            options.own_wins_ties ? shared.score > own.score : shared.score >= own.score;
        if (shared_wins) pick = &shared;
      }
      out->token_ids.insert(out->token_ids.end(), pick->token_ids.begin(), pick->token_ids.end());
      out->parents.insert(out->parents.end(), pick->parents.begin(), pick->parents.end());
      out->probs.insert(out->probs.end(), pick->probs.begin(), pick->probs.end());
      score = pick->score;
      match_len = pick->match_len;
    }
    out->offsets.push_back(out->token_ids.size());
    out->scores.push_back(score);
    out->match_lens.push_back(match_len);
  }
}

}  // namespace drafter
