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
  out->sources.clear();
  for (size_t i = 0; i < n; ++i) {
    const BatchRow& row = rows[i];
    double score = 0.0;
    int32_t match_len = 0;
    DraftSource source = kNoDraft;
    if (row.max_tokens > 0) {
      const auto [context, len] = row.own->tail(0, size_t(options.context_len));
      // The trees in tie order. Each tree's result lives in that tree's scratch until its next
      // call, so every draft stays intact while the others are made (they are different trees).
      struct Candidate {
        SuffixTreeCore* tree;
        DraftSource source;
      };
      const Candidate order[3] = {
          options.own_wins_ties ? Candidate{row.own, kOwn} : Candidate{row.shared, kShared},
          options.own_wins_ties ? Candidate{row.shared, kShared} : Candidate{row.own, kOwn},
          Candidate{row.siblings, kSiblings}};
      const DraftResult* pick = nullptr;
      for (const Candidate& candidate : order) {
        if (candidate.tree == nullptr || (candidate.tree == row.own && candidate.source != kOwn))
          continue;
        const DraftResult& draft =
            draft_one(*candidate.tree, context, len, row.max_tokens, options);
        if (pick == nullptr || draft.score > pick->score) {
          pick = &draft;
          source = candidate.source;
        }
      }
      out->token_ids.insert(out->token_ids.end(), pick->token_ids.begin(), pick->token_ids.end());
      out->parents.insert(out->parents.end(), pick->parents.begin(), pick->parents.end());
      out->probs.insert(out->probs.end(), pick->probs.begin(), pick->probs.end());
      score = pick->score;
      match_len = pick->match_len;
      if (pick->token_ids.empty()) source = kNoDraft;
    }
    out->offsets.push_back(out->token_ids.size());
    out->scores.push_back(score);
    out->match_lens.push_back(match_len);
    out->sources.push_back(source);
  }
}

}  // namespace drafter
