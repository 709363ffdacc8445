// Python bindings of SuffixTreeCore (drafter._core). Argument checks and int32 conversion
// happen in drafter/suffix_tree.py; the core assumes valid input.
#include <sched.h>

#include <algorithm>
#include <cstdint>
#include <exception>
#include <system_error>
#include <thread>
#include <unordered_map>
#include <vector>

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "batch.h"
#include "pricing.h"
#include "suffix_tree.h"

namespace nb = nanobind;
using namespace nb::literals;
using drafter::BatchDrafts;
using drafter::BatchOptions;
using drafter::BatchRow;
using drafter::DraftResult;
using drafter::SuffixTreeCore;

namespace {

using Tokens = nb::ndarray<const int32_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;

template <class T, class Convert>
nb::list to_list(const std::vector<T>& values, Convert convert) {
  PyObject* list = PyList_New(Py_ssize_t(values.size()));
  if (list == nullptr) throw nb::python_error();
  for (size_t i = 0; i < values.size(); ++i) {
    PyObject* item = convert(values[i]);
    if (item == nullptr) {
      Py_DECREF(list);
      throw nb::python_error();
    }
    PyList_SET_ITEM(list, Py_ssize_t(i), item);
  }
  return nb::steal<nb::list>(list);
}

nb::tuple speculate(SuffixTreeCore& tree, Tokens context, int64_t max_tokens, double min_prob,
                    bool use_tree) {
  const DraftResult& d = tree.speculate(context.data(), context.shape(0), max_tokens, min_prob,
                                        use_tree);
  auto as_int = [](int32_t v) { return PyLong_FromLong(v); };
  return nb::make_tuple(to_list(d.token_ids, as_int), to_list(d.parents, as_int),
                        to_list(d.probs, [](double v) { return PyFloat_FromDouble(v); }),
                        d.score, d.match_len);
}

nb::tuple speculate_capped(SuffixTreeCore& tree, Tokens context, int64_t max_tokens,
                           double min_prob, bool use_tree, double spec_factor,
                           double spec_offset) {
  const DraftResult& d = tree.speculate_capped(context.data(), context.shape(0), max_tokens,
                                               min_prob, use_tree, spec_factor, spec_offset);
  auto as_int = [](int32_t v) { return PyLong_FromLong(v); };
  return nb::make_tuple(to_list(d.token_ids, as_int), to_list(d.parents, as_int),
                        to_list(d.probs, [](double v) { return PyFloat_FromDouble(v); }),
                        d.score, d.match_len);
}

SuffixTreeCore* tree_or_null(nb::handle item) {
  return item.is_none() ? nullptr : nb::cast<SuffixTreeCore*>(item);
}

template <class T, class Convert>
PyObject* slice_to_list(const std::vector<T>& values, size_t begin, size_t end,
                        Convert convert) {
  PyObject* list = PyList_New(Py_ssize_t(end - begin));
  if (list == nullptr) return nullptr;
  for (size_t i = begin; i < end; ++i) {
    PyObject* item = convert(values[i]);
    if (item == nullptr) {
      Py_DECREF(list);
      return nullptr;
    }
    PyList_SET_ITEM(list, Py_ssize_t(i - begin), item);
  }
  // It holds ints or floats only, so it can be in no reference cycle: the cyclic collector
  // need not track it (as CPython does with such tuples). Nothing changes a draft's lists.
  PyObject_GC_UnTrack(list);
  return list;
}

// Builds draft_type(token_ids, parents, probs, score, match_len, source) objects. Draft is a
// frozen slots dataclass, whose __init__ sets each field through object.__setattr__: about
// 0.8 us a row, more than drafting it. Where the six fields are slot descriptors, a new
// instance gets them set through the descriptors directly, as __init__ would leave them;
// otherwise the type is called.
class DraftMaker {
 public:
  explicit DraftMaker(nb::handle type) : type_(type) {
    static const char* const kFields[kNumFields] = {"token_ids", "parents", "probs",
                                                    "score",     "match_len", "source"};
    direct_ = PyType_Check(type.ptr());
    for (int i = 0; i < kNumFields && direct_; ++i) {
      slots_[i] = nb::steal(PyObject_GetAttrString(type.ptr(), kFields[i]));
      if (!slots_[i].is_valid()) throw nb::python_error();
      direct_ = Py_TYPE(slots_[i].ptr()) == &PyMemberDescr_Type;
    }
  }

  // Steals nothing; returns a new reference.
  nb::object make(nb::handle tokens, nb::handle parents, nb::handle probs, double score,
                  int32_t match_len, nb::handle source) const {
    if (!direct_) return type_(tokens, parents, probs, score, match_len, source);
    auto* type = reinterpret_cast<PyTypeObject*>(type_.ptr());
    nb::object draft = nb::steal(type->tp_alloc(type, 0));
    if (!draft.is_valid()) throw nb::python_error();
    nb::object values[kNumFields] = {nb::borrow(tokens), nb::borrow(parents), nb::borrow(probs),
                                     nb::float_(score), nb::int_(match_len),
                                     nb::borrow(source)};
    for (int i = 0; i < kNumFields; ++i) {
      PyObject* slot = slots_[i].ptr();
      if (Py_TYPE(slot)->tp_descr_set(slot, draft.ptr(), values[i].ptr()) != 0)
        throw nb::python_error();
    }
    // Untracked too: a frozen Draft refers to its lists (untracked), a float, an int and a str.
    if (PyObject_IS_GC(draft.ptr())) PyObject_GC_UnTrack(draft.ptr());
    return draft;
  }

 private:
  static constexpr int kNumFields = 6;
  nb::handle type_;
  nb::object slots_[kNumFields];
  bool direct_;
};

// A row (own, shared, siblings, shared_seq, fallback) of speculate_batch (drafter/
// suffix_tree.py's batch_row), its slots resolved and checked: own holds sequence 0; a
// shared_seq >= 0 is live in shared (and siblings, if any) and ends with the row's context.
BatchRow batch_row(nb::handle item, int64_t max_tokens, size_t context_len) {
  constexpr int32_t kNone = drafter::kNone;
  if (!PyTuple_Check(item.ptr()) || PyTuple_GET_SIZE(item.ptr()) != 5)
    throw nb::value_error("a row is a tuple (own, shared, siblings, shared_seq, fallback)");
  auto field = [&](Py_ssize_t i) { return nb::handle(PyTuple_GET_ITEM(item.ptr(), i)); };
  SuffixTreeCore* own = tree_or_null(field(0));
  SuffixTreeCore* shared = tree_or_null(field(1));
  SuffixTreeCore* siblings = tree_or_null(field(2));
  const int64_t shared_seq = nb::cast<int64_t>(field(3));
  SuffixTreeCore* fallback = tree_or_null(field(4));
  if (own == nullptr) throw nb::value_error("every row needs its own tree");
  if (max_tokens < 0) throw nb::value_error("max_tokens must be >= 0");
  BatchRow row{own, shared, siblings, fallback, own->live_slot(0), kNone, kNone, max_tokens};
  if (row.own_slot == kNone) throw nb::value_error("every own tree needs its sequence 0");
  if (shared_seq < 0) return row;
  if (shared == nullptr) throw nb::value_error("a row with a shared_seq needs a shared tree");
  row.shared_slot = shared->live_slot(shared_seq);
  if (siblings != nullptr) row.siblings_slot = siblings->live_slot(shared_seq);
  if (row.shared_slot == kNone || (siblings != nullptr && row.siblings_slot == kNone))
    throw nb::value_error("a shared_seq must be live in the row's shared and siblings trees");
  const auto [context, n] = own->tail(row.own_slot, context_len);
  const auto [tail, m] = shared->tail(row.shared_slot, context_len);
  if (m < n || !std::equal(context, context + n, tail + (m - n)))
    throw nb::value_error("a shared_seq's sequence must end with the row's context");
  return row;
}

// Every row's draft in one call (drafter/_native/batch.h); the drafting runs with the GIL
// released. Returns one draft_type(token_ids, parents, probs, score, match_len, source) per
// row, source_names[DraftSource] naming the tree it came from.
nb::list speculate_batch(nb::sequence rows_in, const std::vector<int64_t>& max_tokens,
                         int64_t context_len, double min_prob, bool use_tree,
                         double spec_factor, double spec_offset, bool own_wins_ties,
                         nb::handle draft_type, nb::tuple source_names) {
  const size_t n = nb::len(rows_in);
  if (max_tokens.size() != n) throw nb::value_error("rows and max_tokens differ in length");
  if (nb::len(source_names) != 5) throw nb::value_error("need 5 source names");
  if (context_len < 0) throw nb::value_error("context_len must be >= 0");
  std::vector<BatchRow> rows;
  rows.reserve(n);
  for (size_t i = 0; i < n; ++i)
    rows.push_back(batch_row(rows_in[i], max_tokens[i], size_t(context_len)));
  const BatchOptions options{context_len, min_prob, use_tree, spec_factor, spec_offset,
                             own_wins_ties};
  BatchDrafts drafts;
  {
    nb::gil_scoped_release release;
    drafter::speculate_batch(rows.data(), n, options, &drafts);
  }
  const DraftMaker maker(draft_type);
  auto as_int = [](int32_t v) { return PyLong_FromLong(v); };
  auto as_float = [](double v) { return PyFloat_FromDouble(v); };
  PyObject* result = PyList_New(Py_ssize_t(n));
  if (result == nullptr) throw nb::python_error();
  nb::list out = nb::steal<nb::list>(result);
  for (size_t i = 0; i < n; ++i) {
    const size_t begin = drafts.offsets[i], end = drafts.offsets[i + 1];
    nb::object tokens = nb::steal(slice_to_list(drafts.token_ids, begin, end, as_int));
    nb::object parents = nb::steal(slice_to_list(drafts.parents, begin, end, as_int));
    nb::object probs = nb::steal(slice_to_list(drafts.probs, begin, end, as_float));
    if (!tokens.is_valid() || !parents.is_valid() || !probs.is_valid()) throw nb::python_error();
    nb::object draft = maker.make(tokens, parents, probs, drafts.scores[i], drafts.match_lens[i],
                                  source_names[size_t(drafts.sources[i])]);
    PyList_SET_ITEM(result, Py_ssize_t(i), draft.release().ptr());
  }
  return out;
}

// One sequence of one tree growing by `count` tokens.
struct Growth {
  SuffixTreeCore* tree;
  int64_t seq_id;
  const int32_t* tokens;
  size_t count;
};

// Automatic threading (threads = 0) spreads trees over threads past this many appended tokens
// in all: a token costs about 1.6 us a tree with 64 active suffixes (bench/drafter.py, 256 rows
// of 2 tokens into 3 trees each), and a thread tens of microseconds to start and join.
constexpr size_t kParallelTokens = 256;
constexpr unsigned kMaxThreads = 8;

unsigned usable_cpus() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return unsigned(CPU_COUNT(&set));
  return std::max(1u, std::thread::hardware_concurrency());
}

// Every growth applied. Distinct trees share no state, so they may grow on different threads:
// `threads` of them (0: one per usable CPU, at most kMaxThreads, and only past kParallelTokens
// tokens in all; 1: this thread), each tree wholly on one thread, the biggest trees first, each
// to the thread with the least work so far. A tree's growths keep their order, so every tree
// ends as if they had been applied one at a time.
void grow_trees(const std::vector<Growth>& growths, int64_t threads) {
  size_t total = 0;
  for (const Growth& g : growths) total += g.count;
  unsigned wanted = threads > 0 ? unsigned(std::min<int64_t>(threads, kMaxThreads))
                    : total >= kParallelTokens ? std::min(usable_cpus(), kMaxThreads)
                                               : 1u;
  if (wanted <= 1) {
    for (const Growth& g : growths) g.tree->extend(g.seq_id, g.tokens, g.count);
    return;
  }
  // Each tree's growths in order, and its tokens (its work).
  std::unordered_map<SuffixTreeCore*, size_t> tree_index;
  std::vector<std::vector<const Growth*>> by_tree;
  std::vector<size_t> work;
  for (const Growth& g : growths) {
    auto [it, added] = tree_index.try_emplace(g.tree, by_tree.size());
    if (added) {
      by_tree.emplace_back();
      work.push_back(0);
    }
    by_tree[it->second].push_back(&g);
    work[it->second] += g.count;
  }
  // No thread without a tree (and one, this one, for none).
  wanted = unsigned(std::clamp<size_t>(by_tree.size(), 1, wanted));
  std::vector<size_t> order(by_tree.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t b) { return work[a] > work[b]; });
  std::vector<std::vector<size_t>> share(wanted);  // the trees each thread grows
  std::vector<size_t> load(wanted, 0);
  for (size_t tree : order) {
    const size_t least = size_t(std::min_element(load.begin(), load.end()) - load.begin());
    share[least].push_back(tree);
    load[least] += work[tree];
  }
  std::vector<std::exception_ptr> errors(wanted);
  auto grow_share = [&](unsigned t) {
    try {
      for (size_t tree : share[t])
        for (const Growth* g : by_tree[tree]) g->tree->extend(g->seq_id, g->tokens, g->count);
    } catch (...) {
      errors[t] = std::current_exception();
    }
  };
  std::vector<std::thread> helpers;
  helpers.reserve(wanted - 1);
  std::vector<unsigned> here = {0};  // the shares this thread grows
  for (unsigned t = 1; t < wanted; ++t) {
    try {
      helpers.emplace_back(grow_share, t);
    } catch (const std::system_error&) {  // no thread to be had: this one grows the share
      here.push_back(t);
    }
  }
  for (unsigned t : here) grow_share(t);
  for (std::thread& helper : helpers) helper.join();
  for (const std::exception_ptr& error : errors)
    if (error) std::rethrow_exception(error);
}

// Appends row i's tokens to every sequence of row i, in one call: rows[i] is a tuple
// (core, seq_id, core, seq_id, ...) naming the trees and sequences that grow together (a
// request's own tree and its group's), tokens[i] a sequence of ints in int32 (checked, with the
// rows, before any tree changes). The trees grow with the GIL released, on `threads` threads
// (grow_trees); a row's trees are extended in its order, rows in theirs, so the result equals
// extending one at a time.
void extend_batch(nb::sequence rows_in, nb::sequence tokens_in, int64_t threads) {
  if (threads < 0) throw nb::value_error("threads must be >= 0");
  const size_t n = nb::len(rows_in);
  if (nb::len(tokens_in) != n) throw nb::value_error("rows and tokens differ in length");
  struct Target {
    SuffixTreeCore* tree;
    int64_t seq_id;
    size_t row;
  };
  std::vector<Target> targets;
  std::vector<int32_t> flat;
  std::vector<size_t> offsets(n + 1, 0);
  for (size_t i = 0; i < n; ++i) {
    nb::handle row = rows_in[i];
    const Py_ssize_t size = PyTuple_Check(row.ptr()) ? PyTuple_GET_SIZE(row.ptr()) : -1;
    if (size < 2 || size % 2 != 0)
      throw nb::value_error("a row is a tuple (core, seq_id, core, seq_id, ...)");
    for (Py_ssize_t k = 0; k < size; k += 2) {
      auto* tree = nb::cast<SuffixTreeCore*>(nb::handle(PyTuple_GET_ITEM(row.ptr(), k)));
      const auto seq_id = nb::cast<int64_t>(nb::handle(PyTuple_GET_ITEM(row.ptr(), k + 1)));
      if (tree == nullptr || seq_id < 0) throw nb::value_error("need a tree and a seq_id >= 0");
      targets.push_back({tree, seq_id, i});
    }
    nb::object fast = nb::steal(PySequence_Fast(nb::object(tokens_in[i]).ptr(),
                                                "each row's tokens must be a sequence"));
    if (!fast.is_valid()) throw nb::python_error();
    const Py_ssize_t count = PySequence_Fast_GET_SIZE(fast.ptr());
    PyObject** items = PySequence_Fast_ITEMS(fast.ptr());
    for (Py_ssize_t k = 0; k < count; ++k) {
      // Python ints and numpy's integers (through __index__); not bools, floats or others.
      if (PyBool_Check(items[k])) throw nb::value_error("tokens must be integers");
      int overflow = 0;
      const long long value = PyLong_AsLongLongAndOverflow(items[k], &overflow);
      if (value == -1 && PyErr_Occurred()) {  // not an integer: a float, a string, ...
        PyErr_Clear();
        throw nb::value_error("tokens must be integers");
      }
      if (overflow != 0 || value < INT32_MIN || value > INT32_MAX)
        throw nb::value_error("token ids must fit in int32");
      flat.push_back(int32_t(value));
    }
    offsets[i + 1] = flat.size();
  }
  nb::gil_scoped_release release;
  std::vector<Growth> growths;
  growths.reserve(targets.size());
  for (const Target& target : targets) {
    const size_t begin = offsets[target.row], count = offsets[target.row + 1] - begin;
    if (count != 0) growths.push_back({target.tree, target.seq_id, flat.data() + begin, count});
  }
  grow_trees(growths, threads);
}


using Doubles = nb::ndarray<const double, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using Int64s = nb::ndarray<const int64_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;

template <class T>
nb::ndarray<nb::numpy, T, nb::ndim<1>> to_numpy(std::vector<T>&& values) {
  auto* owned = new std::vector<T>(std::move(values));
  nb::capsule owner(owned, [](void* p) noexcept { delete static_cast<std::vector<T>*>(p); });
  return nb::ndarray<nb::numpy, T, nb::ndim<1>>(owned->data(), {owned->size()}, owner);
}

// MatchRule.trim's arithmetic (pricing.h), its arrays checked against each other here.
nb::tuple cut_drafts(Int64s sizes, Doubles lengths, Int64s match_lens, Int64s source_bins,
                     Int64s parents, Doubles probs, nb::tuple binning, Doubles table,
                     Doubles accepted, Doubles tried, double total_remaining, double step_time,
                     double c_tok, double refund_chance, double probe_chance,
                     Doubles draft_costs, int64_t past_steps) {
  const size_t rows = sizes.shape(0), count = parents.shape(0);
  if (lengths.shape(0) != rows || match_lens.shape(0) != rows || source_bins.shape(0) != rows)
    throw nb::value_error("need a size, length, match length and source per row");
  if (probs.shape(0) != count || draft_costs.shape(0) < count)
    throw nb::value_error("need a probability per token and a draft cost per count");
  const auto prob_edges = nb::cast<Doubles>(binning[0]);
  drafter::Calibration calibration{prob_edges.data(),
                                   int64_t(prob_edges.shape(0)),
                                   nb::cast<int64_t>(binning[1]),
                                   nb::cast<int64_t>(binning[2]),
                                   nb::cast<int64_t>(binning[3]),
                                   table.data(),
                                   accepted.data(),
                                   tried.data()};
  const int64_t cells = calibration.prob_bins * calibration.position_bins *
                        calibration.match_bins * calibration.source_bins;
  if (calibration.prob_bins < 1 || calibration.position_bins < 1 || calibration.match_bins < 1 ||
      cells < 1 || table.shape(0) != size_t(cells) || accepted.shape(0) != size_t(cells) ||
      tried.shape(0) != size_t(cells))
    throw nb::value_error("need an estimate and counts per cell");
  for (size_t r = 0; r < rows; ++r) {
    if (source_bins.data()[r] < 0 || source_bins.data()[r] >= calibration.source_bins)
      throw nb::value_error("source bin out of range");
  }
  drafter::StepCut cut;
  {
    nb::gil_scoped_release release;
    drafter::cut_drafts({sizes.data(), lengths.data(), match_lens.data(), source_bins.data(),
                         rows, parents.data(), probs.data(), count},
                        calibration,
                        {total_remaining, step_time, c_tok, refund_chance, probe_chance,
                         draft_costs.data(), past_steps},
                        &cut);
  }
  return nb::make_tuple(to_numpy(std::move(cut.cells)), to_numpy(std::move(cut.kept)),
                        to_numpy(std::move(cut.kept_per_row)), to_numpy(std::move(cut.tree_rows)));
}

// DraftCalibrator.table's estimates and each position bin's best (pricing.h), as numpy arrays.
nb::tuple calibration_table(Doubles accepted, Doubles tried, nb::tuple shape, Doubles priors,
                            double coarse_weight, double fine_weight, double position_discount,
                            double floor) {
  const size_t prob_bins = nb::cast<size_t>(shape[0]), position_bins = nb::cast<size_t>(shape[1]);
  const size_t rest = nb::cast<size_t>(shape[2]) * nb::cast<size_t>(shape[3]);
  const size_t cells = prob_bins * position_bins * rest;
  if (cells == 0 || accepted.shape(0) != cells || tried.shape(0) != cells ||
      priors.shape(0) != prob_bins)
    throw nb::value_error("need counts per cell and a prior per probability bin");
  if (rest > 128)  // numpy sums longer runs in halves; the native sum follows it up to 128
    throw nb::value_error("at most 128 cells per (probability, position) bin");
  std::vector<double> table(cells), best(position_bins);
  drafter::calibration_table(accepted.data(), tried.data(), prob_bins, position_bins, rest,
                             priors.data(), coarse_weight, fine_weight, position_discount, floor,
                             table.data(), best.data());
  return nb::make_tuple(to_numpy(std::move(table)), to_numpy(std::move(best)));
}

size_t paying_count(Doubles values, Doubles draft_costs, int64_t past_steps, double c_tok) {
  if (draft_costs.shape(0) < values.shape(0))
    throw nb::value_error("need a draft cost per count");
  return drafter::paying_count(values.data(), values.shape(0), draft_costs.data(), past_steps,
                               c_tok);
}

}  // namespace

NB_MODULE(_core, m) {
  m.doc() = "Native suffix tree for speculative decoding (see drafter/suffix_tree.py).";
  nb::class_<SuffixTreeCore>(m, "SuffixTreeCore")
      .def(nb::init<int32_t>(), "max_depth"_a)
      .def(
          "extend",
          [](SuffixTreeCore& t, int64_t seq_id, Tokens tokens) {
            t.extend(seq_id, tokens.data(), tokens.shape(0));
          },
          "seq_id"_a, "tokens"_a)
      .def(
          "remove",
          [](SuffixTreeCore& t, int64_t seq_id) {
            if (!t.contains(seq_id)) throw nb::key_error(std::to_string(seq_id).c_str());
            t.remove(seq_id);
          },
          "seq_id"_a)
      .def("contains", &SuffixTreeCore::contains, "seq_id"_a)
      .def("num_sequences", &SuffixTreeCore::num_sequences)
      .def("num_tokens", &SuffixTreeCore::num_tokens)
      .def("num_nodes", &SuffixTreeCore::num_nodes)
      .def("memory_bytes", &SuffixTreeCore::memory_bytes)
      .def(
          "count",
          [](const SuffixTreeCore& t, Tokens tokens) {
            return t.count(tokens.data(), tokens.shape(0));
          },
          "tokens"_a)
      .def("speculate", &speculate, "context"_a, "max_tokens"_a, "min_prob"_a, "tree"_a)
      .def("speculate_capped", &speculate_capped, "context"_a, "max_tokens"_a, "min_prob"_a,
           "tree"_a, "spec_factor"_a, "spec_offset"_a)
      .def("check_integrity", &SuffixTreeCore::check_integrity);
  m.def("speculate_batch", &speculate_batch, "rows"_a, "max_tokens"_a,
        "context_len"_a, "min_prob"_a, "tree"_a, "spec_factor"_a, "spec_offset"_a,
        "own_wins_ties"_a, "draft_type"_a, "source_names"_a);
  m.def("extend_batch", &extend_batch, "rows"_a, "tokens"_a, "threads"_a = 1);
  m.def("cut_drafts", &cut_drafts, "sizes"_a, "lengths"_a, "match_lens"_a, "source_bins"_a,
        "parents"_a, "probs"_a, "binning"_a, "table"_a, "accepted"_a, "tried"_a,
        "total_remaining"_a, "step_time"_a, "c_tok"_a, "refund_chance"_a, "probe_chance"_a,
        "draft_costs"_a, "past_steps"_a);
  m.def("calibration_table", &calibration_table, "accepted"_a, "tried"_a, "shape"_a, "priors"_a,
        "coarse_weight"_a, "fine_weight"_a, "position_discount"_a, "floor"_a);
  m.def("paying_count", &paying_count, "values"_a, "draft_costs"_a, "past_steps"_a, "c_tok"_a);
}
