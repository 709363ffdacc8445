// The arithmetic of das's per-step cut (MatchRule.trim in drafter/budgets.py) in one call: each
// draft token's calibrator cell, its chance of acceptance with its ancestors', its value to the
// batch, then the tokens that pay, best first. Python gathers the step's drafts into flat
// arrays and builds the cut drafts; this touches no Python object.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace drafter {

// The step's drafting rows, row after row: row r's tokens are the next sizes[r] entries of
// parents and probs.
struct StepDrafts {
  const int64_t* sizes;
  const double* lengths;       // each row's remaining length (its share of the batch's wait)
  const int64_t* match_lens;   // each row's draft's match length
  const int64_t* source_bins;  // each row's draft's source, binned
  size_t rows;
  const int64_t* parents;  // each token's parent in its draft, -1: a root
  const double* probs;     // each token's path probability
  size_t count;
};

// DraftCalibrator's binning and state: a token's cell is
// ((prob_bin * position_bins + position_bin) * match_bins + match_bin) * source_bins + source,
// prob_bin the first b with prob >= prob_edges[b] (the last bin if none), position_bin its
// depth's bit length and match_bin that of match_len - 1, each capped at its last bin.
struct Calibration {
  const double* prob_edges;  // descending, prob_bins of them
  int64_t prob_bins;
  int64_t position_bins;
  int64_t match_bins;
  int64_t source_bins;
  const double* table;     // each cell's estimate
  const double* accepted;  // each cell's decayed counts (the probes' optimistic estimate)
  const double* tried;
};

struct StepPrices {
  double total_remaining;  // the batch's remaining lengths, summed
  double step_time;        // the step's time at its batch size
  double c_tok;
  double refund_chance;  // 0: no refunds
  double probe_chance;   // 0: no probes
  // draft_costs[k - 1]: what k draft tokens add to the step, for k = 1 .. count.
  const double* draft_costs;
  int64_t past_steps;  // from this many tokens on, the step's measured steps are passed
};

// Per token: its cell and whether it is kept; per row: how many of its tokens are kept and
// whether its draft is a tree (not a chain).
struct StepCut {
  std::vector<int64_t> cells;
  std::vector<uint8_t> kept;
  std::vector<int64_t> kept_per_row;
  std::vector<uint8_t> tree_rows;
};

void cut_drafts(const StepDrafts& drafts, const Calibration& calibration,
                const StepPrices& prices, StepCut* out);

// DraftCalibrator.table (drafter/acceptance.py): every cell's estimate from its decayed counts
// (accepted, tried: prob_bins x position_bins x rest, rest = match bins x sources), each shrunk
// by fine_weight toward its (probability, position) bin's coarse estimate, which is shrunk by
// coarse_weight toward a prior: priors[prob bin] at the first position bin, the coarse
// estimate of the position bin before times position_discount deeper; at least floor. Also,
// per position bin, the best cell's estimate capped at 1 (best_by_position).
void calibration_table(const double* accepted, const double* tried, size_t prob_bins,
                       size_t position_bins, size_t rest, const double* priors,
                       double coarse_weight, double fine_weight, double position_discount,
                       double floor, double* table, double* best_by_position);

// How many of these values (best first) pay for what they add to the step: the count whose
// summed values most exceed draft_costs[count - 1] (the largest such count, within 1e-9 c_tok;
// 0 if none). Past past_steps, no value below c_tok is taken, nor any after it.
size_t paying_count(const double* values, size_t n, const double* draft_costs,
                    int64_t past_steps, double c_tok);

}  // namespace drafter
