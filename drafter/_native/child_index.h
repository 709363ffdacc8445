// ChildIndex: one open-addressing hash map (parent node, first token) -> child node, shared by
// every node whose fan-out is too large for a sibling-list scan (the root of a 32k vocabulary
// has thousands of children). Linear probing, power-of-two capacity, backward-shift deletion,
// so there are no tombstones and a lookup stops at the first empty slot.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace drafter {

class ChildIndex {
 public:
  static constexpr int32_t kAbsent = -1;

  int32_t find(int32_t parent, int32_t token) const {
    if (slots_.empty()) return kAbsent;
    for (size_t i = home(parent, token);; i = (i + 1) & mask_) {
      const Slot& slot = slots_[i];
      if (slot.parent == kEmpty) return kAbsent;
      if (slot.parent == parent && slot.token == token) return slot.child;
    }
  }

  void prefetch(int32_t parent, int32_t token) const {
    if (!slots_.empty()) __builtin_prefetch(&slots_[home(parent, token)]);
  }

  // The key must be absent.
  void insert(int32_t parent, int32_t token, int32_t child) {
    if ((used_ + 1) * 4 > slots_.size() * 3) grow();
    size_t i = home(parent, token);
    while (slots_[i].parent != kEmpty) i = (i + 1) & mask_;
    slots_[i] = Slot{parent, token, child};
    ++used_;
  }

  // The key must be present.
  void assign(int32_t parent, int32_t token, int32_t child) { slots_[locate(parent, token)].child = child; }

  // The key must be present.
  void erase(int32_t parent, int32_t token) {
    size_t hole = locate(parent, token);
    // Shift later members of the probe run back into the hole unless that would move one
    // before its home slot.
    for (size_t j = (hole + 1) & mask_; slots_[j].parent != kEmpty; j = (j + 1) & mask_) {
      size_t h = home(slots_[j].parent, slots_[j].token);
      if (((j - h) & mask_) >= ((j - hole) & mask_)) {
        slots_[hole] = slots_[j];
        hole = j;
      }
    }
    slots_[hole].parent = kEmpty;
    --used_;
  }

  size_t size() const { return used_; }
  size_t memory_bytes() const { return slots_.capacity() * sizeof(Slot); }

  // Calls fn(parent, token, child) for every entry (integrity checks).
  template <class Fn>
  void for_each(Fn fn) const {
    for (const Slot& slot : slots_)
      if (slot.parent != kEmpty) fn(slot.parent, slot.token, slot.child);
  }

 private:
  static constexpr int32_t kEmpty = -1;
  struct Slot {
    int32_t parent;  // kEmpty marks a free slot
    int32_t token;
    int32_t child;
  };

  size_t home(int32_t parent, int32_t token) const {
    uint64_t k = (uint64_t(uint32_t(parent)) << 32) | uint32_t(token);
    k ^= k >> 33;  // murmur3 finalizer
    k *= 0xff51afd7ed558ccdULL;
    k ^= k >> 33;
    k *= 0xc4ceb9fe1a85ec53ULL;
    k ^= k >> 33;
    return size_t(k) & mask_;
  }

  size_t locate(int32_t parent, int32_t token) const {
    size_t i = home(parent, token);
    while (slots_[i].parent != parent || slots_[i].token != token) i = (i + 1) & mask_;
    return i;
  }

  void grow() {
    std::vector<Slot> old;
    old.swap(slots_);
    slots_.assign(old.empty() ? 64 : old.size() * 2, Slot{kEmpty, 0, 0});
    mask_ = slots_.size() - 1;
    used_ = 0;
    for (const Slot& slot : old)
      if (slot.parent != kEmpty) insert(slot.parent, slot.token, slot.child);
  }

  std::vector<Slot> slots_;
  size_t used_ = 0;
  size_t mask_ = 0;
};

}  // namespace drafter
