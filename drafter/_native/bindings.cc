// Python bindings of SuffixTreeCore (drafter._core). Argument checks and int32 conversion
// happen in drafter/suffix_tree.py; the core assumes valid input.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>

#include "suffix_tree.h"

namespace nb = nanobind;
using namespace nb::literals;
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
      .def("check_integrity", &SuffixTreeCore::check_integrity);
}
