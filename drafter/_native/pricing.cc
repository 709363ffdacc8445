// Every float is computed in the order drafter/budgets.py's reference arithmetic computes it
// (tests/drafter/test_match_policy.py checks the cut against a token-by-token reference), so
// replays planned by it are the same to the last digit.
#include "pricing.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <numeric>
#include <stdexcept>

namespace drafter {

namespace {

int64_t capped_bit_length(int64_t value, int64_t cap) {
  return std::min<int64_t>(cap, std::bit_width(uint64_t(std::max<int64_t>(value, 0))));
}

int64_t cell_of(const Calibration& c, double prob, int64_t depth, int64_t match_len,
                int64_t source) {
  int64_t prob_bin = c.prob_bins - 1;
  for (int64_t b = 0; b < c.prob_bins; ++b) {
    if (prob >= c.prob_edges[b]) {
      prob_bin = b;
      break;
    }
  }
  const int64_t position = capped_bit_length(depth, c.position_bins - 1);
  const int64_t match = capped_bit_length(match_len - 1, c.match_bins - 1);
  return ((prob_bin * c.position_bins + position) * c.match_bins + match) * c.source_bins + source;
}

// One standard deviation above the mean of Beta(1 + accepted, 1 + rejected): the cell's chance
// as its own evidence could still have it.
double optimistic(const Calibration& c, int64_t cell) {
  const double accepted = c.accepted[cell];
  const double a = 1.0 + accepted;
  const double b = 1.0 + std::max(c.tried[cell] - accepted, 0.0);
  const double n = a + b;
  return a / n + std::sqrt(a * b / (n * n * (n + 1.0)));
}

// numpy's sum of n contiguous doubles (its pairwise summation, for n up to its block of 128;
// numpy starts the sum at 0.0), so the table equals the numpy formula to the bit.
double numpy_sum(const double* a, size_t n) {
  if (n < 8) {
    double sum = 0.0;
    for (size_t i = 0; i < n; ++i) sum += a[i];
    return sum;
  }
  double r[8];
  for (size_t k = 0; k < 8; ++k) r[k] = a[k];
  size_t i = 8;
  for (; i < n - n % 8; i += 8) {
    for (size_t k = 0; k < 8; ++k) r[k] += a[i + k];
  }
  double sum = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
  for (; i < n; ++i) sum += a[i];
  return 0.0 + sum;
}

}  // namespace

void calibration_table(const double* accepted, const double* tried, size_t prob_bins,
                       size_t position_bins, size_t rest, const double* priors,
                       double coarse_weight, double fine_weight, double position_discount,
                       double floor, double* table, double* best_by_position) {
  std::vector<double> prior(priors, priors + prob_bins);
  std::vector<double> coarse(prob_bins);
  for (size_t j = 0; j < position_bins; ++j) {
    double best = -INFINITY;
    for (size_t b = 0; b < prob_bins; ++b) {
      const size_t at = (b * position_bins + j) * rest;
      coarse[b] = (numpy_sum(accepted + at, rest) + coarse_weight * prior[b]) /
                  (numpy_sum(tried + at, rest) + coarse_weight);
      const double toward = fine_weight * coarse[b];
      for (size_t k = at; k < at + rest; ++k) {
        table[k] = std::max((accepted[k] + toward) / (tried[k] + fine_weight), floor);
        best = std::max(best, table[k]);
      }
      prior[b] = coarse[b] * position_discount;
    }
    best_by_position[j] = std::min(best, 1.0);
  }
}

size_t paying_count(const double* values, size_t n, const double* draft_costs,
                    int64_t past_steps, double c_tok) {
  const double slack = 1e-9 * c_tok;  // a value exactly at the price is drafted
  for (size_t i = size_t(std::max<int64_t>(past_steps, 0)); i < n; ++i) {
    if (values[i] < c_tok - slack) {
      n = i;
      break;
    }
  }
  double sum = 0.0, best = 0.0;  // best: the largest net of any smaller count (0: none)
  size_t taken = 0;
  for (size_t k = 1; k <= n; ++k) {
    sum += values[k - 1];
    const double net = sum - draft_costs[k - 1];
    if (net >= best - slack) taken = k;
    best = std::max(best, net);
  }
  return taken;
}

void cut_drafts(const StepDrafts& d, const Calibration& c, const StepPrices& p, StepCut* out) {
  const size_t count = d.count;
  out->cells.assign(count, 0);
  out->kept.assign(count, 0);
  out->kept_per_row.assign(d.rows, 0);
  out->tree_rows.assign(d.rows, 0);
  std::vector<int64_t> depth(count), row_of(count), probe_parent(count, -1);
  std::vector<double> chance(count);
  std::vector<uint8_t> has_child;
  size_t at = 0;
  for (size_t r = 0; r < d.rows; ++r) {
    const int64_t size = d.sizes[r];
    if (size < 0 || at + size_t(size) > count) throw std::invalid_argument("bad draft sizes");
    has_child.assign(size_t(size), 0);
    for (int64_t i = 0; i < size; ++i) {
      const size_t t = at + size_t(i);
      const int64_t parent = d.parents[t];
      if (parent < -1 || parent >= i) throw std::invalid_argument("a parent must come first");
      if (parent != i - 1) out->tree_rows[r] = 1;
      row_of[t] = int64_t(r);
      depth[t] = parent < 0 ? 0 : depth[at + size_t(parent)] + 1;
      const int64_t cell = cell_of(c, d.probs[t], depth[t], d.match_lens[r], d.source_bins[r]);
      out->cells[t] = cell;
      const double own = std::min(c.table[cell], 1.0);
      chance[t] = parent < 0 ? own : std::min(chance[at + size_t(parent)], own);
      // A probe follows its parent only as the parent's first (most likely) child.
      if (parent >= 0 && !has_child[size_t(parent)]) probe_parent[t] = int64_t(at) + parent;
      if (parent >= 0) has_child[size_t(parent)] = 1;
    }
    at += size_t(size);
  }
  if (at != count) throw std::invalid_argument("bad draft sizes");

  std::vector<double> value(count);
  for (size_t t = 0; t < count; ++t) {
    double valued = chance[t];
    const int64_t parent = probe_parent[t];
    if (p.probe_chance > 0.0 && parent >= 0) {
      const double above = chance[size_t(parent)];
      if (above >= p.probe_chance && valued < p.probe_chance)
        valued = std::max(valued, std::min(optimistic(c, out->cells[t]), above));
    }
    double worth = valued * d.lengths[row_of[t]] / p.total_remaining * p.step_time;
    if (p.refund_chance > 0.0 && valued >= p.refund_chance) worth += valued * p.c_tok;
    value[t] = worth;
  }
  // Best first; a tie keeps the tokens' order, so a parent comes before its child.
  std::vector<size_t> order(count);
  std::iota(order.begin(), order.end(), size_t(0));
  std::stable_sort(order.begin(), order.end(),
                   [&value](size_t a, size_t b) { return value[a] > value[b]; });
  std::vector<double> sorted(count);
  for (size_t i = 0; i < count; ++i) sorted[i] = value[order[i]];
  const size_t taken = paying_count(sorted.data(), count, p.draft_costs, p.past_steps, p.c_tok);
  for (size_t i = 0; i < taken; ++i) {
    out->kept[order[i]] = 1;
    ++out->kept_per_row[size_t(row_of[order[i]])];
  }
}

}  // namespace drafter
