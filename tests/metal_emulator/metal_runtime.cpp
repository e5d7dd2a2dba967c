// metal_runtime.cpp -- fiber scheduler that runs the threads of one Metal
// threadgroup on one OS thread.  Compiled once into a shared library that the
// kernel libraries (see emulator.py) call into for barriers, SIMD
// collectives and threadgroup memory; `mtl_launch` runs a whole grid.
#include "metal_shim.h"

#include <mutex>
#include <numeric>
#include <thread>

namespace mtl_rt {

using metal::uint;
using metal::uint3;


typedef void (*BodyFn)(void** args, const Attrs& a);

// ------------------------------------------------------------------ context switch
// On x86-64 a fiber switch saves the callee-saved registers and the FP control words and swaps
// stacks (about 20 instructions); swapcontext also saves and restores the signal mask with two
// system calls per switch, which was half of the emulator's time. Elsewhere: ucontext.
#if defined(__x86_64__) && !defined(MTL_EMULATOR_UCONTEXT)
struct Ctx {
  void* sp = nullptr;
};
extern "C" __attribute__((visibility("hidden"))) void mtl_rt_ctx_switch(void** save_sp,
                                                                         void* load_sp);
asm(R"(
  .text
  .p2align 4
  .hidden mtl_rt_ctx_switch
  .globl mtl_rt_ctx_switch
  .type mtl_rt_ctx_switch, @function
mtl_rt_ctx_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size mtl_rt_ctx_switch, .-mtl_rt_ctx_switch
)");
static inline void ctx_switch(Ctx& from, Ctx& to) { mtl_rt_ctx_switch(&from.sp, to.sp); }
// a fresh context that starts `entry` (which never returns) on the stack [lo, lo + size)
static void ctx_make(Ctx& c, char* lo, size_t size, void (*entry)()) {
  uintptr_t top = (uintptr_t(lo) + size) & ~uintptr_t(15);
  uint64_t* s = reinterpret_cast<uint64_t*>(top - 16);  // 16-aligned: entry's return slot
  s[1] = 0;                                            // entry's own (fake) return address
  s[0] = uint64_t(reinterpret_cast<uintptr_t>(entry));
  for (int i = 1; i <= 6; ++i) s[-i] = 0;              // rbp rbx r12 r13 r14 r15
  uint32_t csr[2];
  asm volatile("stmxcsr %0" : "=m"(csr[0]));
  asm volatile("fnstcw %0" : "=m"(csr[1]));
  std::memcpy(&s[-7], csr, 8);
  c.sp = &s[-7];
}
#else
struct Ctx {
  ucontext_t uc;
};
static inline void ctx_switch(Ctx& from, Ctx& to) { swapcontext(&from.uc, &to.uc); }
static void ctx_make(Ctx& c, char* lo, size_t size, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = lo;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}
#endif

enum FiberState { READY = 0, WAIT_TG = 1, WAIT_SG = 2, DONE = 3 };

struct Fiber {
  Ctx ctx;
  FiberState state;
  Attrs attrs;
  // private threadgroup-memory mode: this thread's view of the arena, and the arena as it was
  // when the view was last refreshed (a byte that differs was written by this thread)
  unsigned char* view = nullptr;
  unsigned char* snap = nullptr;
};

struct SimdGroup {
  int alive = 0;
  int arrived = 0;
  uint64_t gen = 0;
  int kind = 0;
  unsigned arrive_mask = 0;
  unsigned result_mask[2] = {0, 0};
  alignas(16) unsigned char slots[2][32 * 32];
};

static constexpr size_t kMaxThreadgroupMemory = 32768;
static constexpr size_t kArenaBytes = 1 << 20;

struct Launch;

// a threadgroup variable: its offset in the arena, its size and its name (for bounds messages)
struct TgSlot {
  bool set = false;
  size_t off = 0, bytes = 0;
  const char* name = nullptr;
};

struct GroupCtx {
  Ctx sched;
  Launch* launch = nullptr;
  std::vector<Fiber> fibers;
  std::vector<SimdGroup> sgs;
  char* stacks = nullptr;
  size_t stack_size = 0;
  size_t stacks_bytes = 0;
  int nthreads = 0;
  int cur = 0;
  int alive = 0;
  int tg_arrived = 0;
  uint64_t tg_gen = 0;
  std::vector<TgSlot> tg_slots;
  unsigned char* arena = nullptr;
  size_t arena_used = 0;
  bool aborted = false;
  std::string error;
  BodyFn body = nullptr;
  void** args = nullptr;
  bool private_tg = false;
  // private mode: 2 x 32 KiB per thread, mapped lazily (only the pages a kernel's threadgroup
  // variables cover are ever touched)
  unsigned char* views = nullptr;
  size_t views_bytes = 0;

  ~GroupCtx() {
    if (stacks) munmap(stacks, stacks_bytes);
    if (views) munmap(views, views_bytes);
    std::free(arena);
  }
};

thread_local GroupCtx* tl_group = nullptr;

[[noreturn]] static void fail(const std::string& msg) {
  GroupCtx* g = tl_group;
  g->error = msg;
  g->aborted = true;
  Fiber& f = g->fibers[g->cur];
  ctx_switch(f.ctx, g->sched);
  std::abort(); // never resumed
}

static std::string where(const Attrs& a) {
  char buf[160];
  std::snprintf(buf, sizeof(buf),
                "thread_position_in_grid=(%u,%u,%u) threadgroup=(%u,%u,%u) "
                "thread_index_in_threadgroup=%u",
                a.thread_position_in_grid.x, a.thread_position_in_grid.y,
                a.thread_position_in_grid.z, a.threadgroup_position_in_grid.x,
                a.threadgroup_position_in_grid.y,
                a.threadgroup_position_in_grid.z, a.thread_index_in_threadgroup);
  return buf;
}

static void block_current() {
  GroupCtx* g = tl_group;
  ctx_switch(g->fibers[g->cur].ctx, g->sched);
}

static void release_tg(GroupCtx* g) {
  g->tg_gen++;
  g->tg_arrived = 0;
  for (auto& f : g->fibers)
    if (f.state == WAIT_TG) f.state = READY;
}

static void release_sg(GroupCtx* g, int sgi) {
  SimdGroup& s = g->sgs[sgi];
  s.result_mask[s.gen & 1] = s.arrive_mask;
  s.gen++;
  s.arrived = 0;
  s.arrive_mask = 0;
  int n = g->nthreads;
  for (int i = sgi * 32; i < std::min(n, sgi * 32 + 32); ++i)
    if (g->fibers[i].state == WAIT_SG) g->fibers[i].state = READY;
}

// Private threadgroup-memory mode (a kernel with a barrier whose flags lack mem_threadgroup):
// a thread's threadgroup writes reach the other threads only through a barrier that has the
// flag -- published when the writer arrives, read by every thread when it leaves.
static void publish_view(GroupCtx* g, Fiber& f) {
  for (size_t i = 0; i < g->arena_used; ++i)
    if (f.view[i] != f.snap[i]) g->arena[i] = f.view[i];
}

static void refresh_view(GroupCtx* g, Fiber& f) {
  std::memcpy(f.view, g->arena, g->arena_used);
  std::memcpy(f.snap, g->arena, g->arena_used);
}

static constexpr unsigned kMemThreadgroup = 2;  // metal::mem_flags::mem_threadgroup

void tg_barrier(unsigned flags) {
  GroupCtx* g = tl_group;
  Fiber& f = g->fibers[g->cur];
  const bool sync_memory = g->private_tg && (flags & kMemThreadgroup);
  if (sync_memory) publish_view(g, f);
  f.state = WAIT_TG;
  if (++g->tg_arrived == g->alive) release_tg(g);
  if (f.state != READY) block_current();
  if (sync_memory) refresh_view(g, f);
}

static const char* kind_name(int kind) {
  static const char* names[] = {
      "?", "sum", "product", "max", "min", "and", "or", "xor",
      "prefix_inclusive_sum", "prefix_exclusive_sum",
      "prefix_inclusive_product", "prefix_exclusive_product", "shuffle",
      "shuffle_down", "shuffle_up", "shuffle_xor", "shuffle_rotate_down",
      "shuffle_rotate_up", "broadcast", "broadcast_first", "all", "any",
      "is_first"};
  if (kind == 1000) return "simdgroup_barrier";
  if (kind == 40) return "simdgroup_multiply_accumulate";
  int k = kind % 64;
  return k < int(sizeof(names) / sizeof(names[0])) ? names[k] : "?";
}

const unsigned char* sg_exchange(int kind, const void* src, size_t bytes,
                                 unsigned* lane_out, unsigned* mask_out) {
  GroupCtx* g = tl_group;
  Fiber& f = g->fibers[g->cur];
  unsigned lane = f.attrs.thread_index_in_simdgroup;
  int sgi = f.attrs.simdgroup_index_in_threadgroup;
  SimdGroup& s = g->sgs[sgi];
  uint64_t my_gen = s.gen;
  int buf = int(my_gen & 1);
  if (bytes) std::memcpy(s.slots[buf] + 32 * lane, src, bytes);
  if (s.arrived == 0) {
    s.kind = kind;
  } else if (s.kind != kind) {
    std::string pfx = kind >= 64 && kind != 1000 ? "quad_" : "simd_";
    std::string pfx0 = s.kind >= 64 && s.kind != 1000 ? "quad_" : "simd_";
    fail("divergent SIMD-group collectives: lanes of simdgroup " +
         std::to_string(sgi) + " called " +
         (s.kind == 1000 ? std::string("") : pfx0) + kind_name(s.kind) +
         " while lane " + std::to_string(lane) + " called " +
         (kind == 1000 ? std::string("") : pfx) + kind_name(kind) + " (" +
         where(f.attrs) +
         "). Every active lane of a simdgroup must reach the same collective.");
  }
  s.arrived++;
  s.arrive_mask |= 1u << lane;
  f.state = WAIT_SG;
  if (s.arrived == s.alive) release_sg(g, sgi);
  if (f.state != READY) block_current();
  *lane_out = lane;
  *mask_out = s.result_mask[buf];
  return s.slots[buf];
}

void kernel_error(const char* msg) {
  fail(std::string(msg) + " (" + where(tl_group->fibers[tl_group->cur].attrs) + ")");
}

unsigned sg_lane() {
  GroupCtx* g = tl_group;
  return g->fibers[g->cur].attrs.thread_index_in_simdgroup;
}

void sg_barrier(unsigned flags) {
  GroupCtx* g = tl_group;
  const bool sync_memory = g->private_tg && (flags & kMemThreadgroup);
  if (sync_memory) publish_view(g, g->fibers[g->cur]);
  unsigned lane, mask;
  sg_exchange(1000, nullptr, 0, &lane, &mask);
  if (sync_memory) refresh_view(g, g->fibers[g->cur]);
}

void* tg_slot(int slot, size_t bytes, size_t align, const char* name) {
  GroupCtx* g = tl_group;
  if (slot >= int(g->tg_slots.size())) g->tg_slots.resize(slot + 1);
  TgSlot& ts = g->tg_slots[slot];
  if (!ts.set) {
    size_t off = (g->arena_used + align - 1) / align * align;
    if (off + bytes > kMaxThreadgroupMemory) {
      fail("threadgroup memory exceeds the 32 KiB Metal limit (" +
           std::to_string(off + bytes) + " bytes requested)");
    }
    ts.set = true;
    ts.off = off;
    ts.bytes = bytes;
    ts.name = name;
    g->arena_used = off + bytes;
    if (g->private_tg) {  // a new variable: garbage in every thread's view too
      for (int i = 0; i < g->nthreads; ++i) {
        std::memset(g->fibers[i].view + off, 0xFF, bytes);
        std::memset(g->fibers[i].snap + off, 0xFF, bytes);
      }
    }
  }
  if (g->private_tg) return g->fibers[g->cur].view + ts.off;
  return g->arena + ts.off;
}

static void fiber_main() {
  GroupCtx* g = tl_group;
  int i = g->cur;
  g->body(g->args, g->fibers[i].attrs);
  // thread exits: it no longer takes part in barriers / collectives
  Fiber& f = g->fibers[i];
  f.state = DONE;
  g->alive--;
  int sgi = f.attrs.simdgroup_index_in_threadgroup;
  SimdGroup& s = g->sgs[sgi];
  s.alive--;
  if (s.arrived > 0 && s.arrived == s.alive) release_sg(g, sgi);
  if (g->tg_arrived > 0 && g->tg_arrived == g->alive) release_tg(g);
  ctx_switch(f.ctx, g->sched);
  std::abort();
}

static const char* state_name(FiberState s) {
  switch (s) {
    case WAIT_TG: return "threadgroup_barrier";
    case WAIT_SG: return "a simd collective / simdgroup_barrier";
    default: return "?";
  }
}

struct Launch {
  BodyFn body;
  void** args;
  int schedule = 0;  // 0: lowest thread index first, 1: highest first, >= 2: random (seed)
  bool private_tg = false;
  long grid[3], tg[3], ngroups[3];
  size_t stack_size;
  std::atomic<long> next{0};
  std::mutex err_mu;
  std::string error;
  std::atomic<bool> failed{false};
  std::vector<Region> regions;  // the buffers of the launch (inputs, outputs, shapes)
};

// ------------------------------------------------------------------ bounds of every access
// Checked pointers (metal_shim.h) carry the region they point into. One made from a raw
// address (&buf[i], a launch argument) finds it here: a buffer of the launch, else a
// threadgroup variable of this group (in the arena, or in this thread's private view).
Region find_region(const void* p) {
  const unsigned char* b = static_cast<const unsigned char*>(p);
  GroupCtx* g = tl_group;
  if (!g) return Region{nullptr, reinterpret_cast<const unsigned char*>(~uintptr_t(0)),
                        nullptr, kUnknown};
  for (const Region& r : g->launch->regions)
    if (b >= r.lo && b <= r.hi) return r;
  const unsigned char* bases[2] = {g->arena, g->private_tg ? g->fibers[g->cur].view : nullptr};
  for (const unsigned char* base : bases) {
    if (!base || b < base || b > base + g->arena_used) continue;
    for (const TgSlot& ts : g->tg_slots)
      if (ts.set && b >= base + ts.off && b <= base + ts.off + ts.bytes)
        return Region{base + ts.off, base + ts.off + ts.bytes, ts.name, kThreadgroup};
  }
  // not a buffer of ours (a program-scope constant array, say): not checked
  return Region{nullptr, reinterpret_cast<const unsigned char*>(~uintptr_t(0)), nullptr,
                kUnknown};
}

void out_of_bounds(const Region& r, const void* addr, size_t size) {
  static const char* kinds[] = {"input", "output", "threadgroup array", "argument", "?", "?"};
  std::string msg;
  if (r.kind == kNull) {
    msg = "access through a null device / threadgroup pointer";
  } else {
    const long off = long(static_cast<const unsigned char*>(addr) - r.lo);
    const long bytes = long(r.hi - r.lo);
    msg = std::string("out-of-bounds ") + (r.kind == kInput || r.kind == kArgument
                                               ? "read of " : "access to ") +
          kinds[r.kind] + " '" + (r.name ? r.name : "?") + "': ";
    if (off % long(size) == 0 && bytes % long(size) == 0) {
      msg += "element " + std::to_string(off / long(size)) + " of " +
             std::to_string(bytes / long(size)) + " (" + std::to_string(size) +
             "-byte elements)";
    } else {
      msg += "bytes [" + std::to_string(off) + ", " + std::to_string(off + long(size)) +
             ") of " + std::to_string(bytes);
    }
    msg += "; reported even when the value read is discarded";
  }
  kernel_error(msg.c_str());
}

static bool run_group(GroupCtx& g, Launch& L, long gid) {
  long bx = gid % L.ngroups[0];
  long by = (gid / L.ngroups[0]) % L.ngroups[1];
  long bz = gid / (L.ngroups[0] * L.ngroups[1]);
  long b[3] = {bx, by, bz};
  uint act[3];
  for (int d = 0; d < 3; ++d)
    act[d] = uint(std::min(L.tg[d], L.grid[d] - b[d] * L.tg[d]));
  int n = int(act[0] * act[1] * act[2]);
  g.nthreads = n;
  g.alive = n;
  g.tg_arrived = 0;
  g.tg_gen = 0;
  g.aborted = false;
  g.error.clear();
  g.body = L.body;
  g.args = L.args;
  g.tg_slots.assign(g.tg_slots.size(), TgSlot{});
  g.launch = &L;
  if (g.arena_used) std::memset(g.arena, 0xFF, g.arena_used);
  g.arena_used = 0;
  int nsg = (n + 31) / 32;
  g.sgs.resize(nsg);
  for (int s = 0; s < nsg; ++s) {
    SimdGroup& sg = g.sgs[s];
    sg.alive = std::min(32, n - 32 * s);
    sg.arrived = 0;
    sg.gen = 0;
    sg.arrive_mask = 0;
    std::memset(sg.slots, 0xFF, sizeof(sg.slots));
  }
  uint dispatch_n = uint(L.tg[0] * L.tg[1] * L.tg[2]);
  for (int i = 0; i < n; ++i) {
    Fiber& f = g.fibers[i];
    Attrs& a = f.attrs;
    uint lx = i % act[0], ly = (i / act[0]) % act[1], lz = i / (act[0] * act[1]);
    a.thread_position_in_threadgroup = uint3(lx, ly, lz);
    a.threadgroup_position_in_grid = uint3(uint(bx), uint(by), uint(bz));
    a.thread_position_in_grid =
        uint3(uint(bx * L.tg[0] + lx), uint(by * L.tg[1] + ly), uint(bz * L.tg[2] + lz));
    a.threads_per_threadgroup = uint3(act[0], act[1], act[2]);
    a.dispatch_threads_per_threadgroup = uint3(uint(L.tg[0]), uint(L.tg[1]), uint(L.tg[2]));
    a.threadgroups_per_grid =
        uint3(uint(L.ngroups[0]), uint(L.ngroups[1]), uint(L.ngroups[2]));
    a.threads_per_grid = uint3(uint(L.grid[0]), uint(L.grid[1]), uint(L.grid[2]));
    a.grid_origin = uint3(0u, 0u, 0u);
    a.grid_size = a.threads_per_grid;
    a.thread_index_in_threadgroup = uint(i);
    a.thread_index_in_simdgroup = uint(i % 32);
    a.simdgroup_index_in_threadgroup = uint(i / 32);
    a.simdgroups_per_threadgroup = uint(nsg);
    a.threads_per_simdgroup = 32;
    a.thread_execution_width = 32;
    a.quadgroup_index_in_threadgroup = uint(i / 4);
    a.quadgroups_per_threadgroup = uint((n + 3) / 4);
    a.thread_index_in_quadgroup = uint(i % 4);
    a.dispatch_simdgroups_per_threadgroup = (dispatch_n + 31) / 32;
    a.dispatch_quadgroups_per_threadgroup = (dispatch_n + 3) / 4;
    ctx_make(f.ctx, g.stacks + size_t(i) * g.stack_size + 4096, g.stack_size - 4096,
             fiber_main);
    f.state = READY;
  }
  g.private_tg = L.private_tg;
  if (g.private_tg) {
    const size_t need = size_t(n) * 2 * kMaxThreadgroupMemory;
    if (g.views_bytes < need) {
      if (g.views) munmap(g.views, g.views_bytes);
      void* m = mmap(nullptr, need, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      if (m == MAP_FAILED) {
        std::lock_guard<std::mutex> lk(L.err_mu);
        L.error = "could not allocate private threadgroup-memory views";
        L.failed = true;
        return false;
      }
      g.views = static_cast<unsigned char*>(m);
      g.views_bytes = need;
    }
    for (int i = 0; i < n; ++i) {
      g.fibers[i].view = g.views + size_t(i) * 2 * kMaxThreadgroupMemory;
      g.fibers[i].snap = g.fibers[i].view + kMaxThreadgroupMemory;
    }
  }
  // the order in which runnable threads get the CPU: a kernel whose result depends on it has
  // a race (emulator.py compares the outputs of several schedules)
  std::vector<int> order(n);
  std::iota(order.begin(), order.end(), 0);
  if (L.schedule == 1) std::reverse(order.begin(), order.end());
  uint64_t rng = 0x9E3779B97F4A7C15ull * uint64_t(L.schedule * 1000003L + gid + 1);
  auto next_random = [&rng]() {
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
  };
  // random schedules also hold back one simdgroup per barrier phase (a slow warp) until no
  // other thread can run: it then reads threadgroup memory the others already moved past
  const bool random = L.schedule >= 2;
  int slow_sg = random ? int(next_random() % uint64_t(nsg)) : -1;
  uint64_t phase = g.tg_gen;
  tl_group = &g;
  while (g.alive > 0) {
    bool progressed = false;
    if (random) {
      for (int j = n - 1; j > 0; --j) std::swap(order[j], order[next_random() % (j + 1)]);
    }
    for (int pass = 0; pass < (random ? 2 : 1) && !progressed; ++pass) {
      for (int k = 0; k < n && !g.aborted; ++k) {
        const int i = order[k];
        if (g.fibers[i].state != READY) continue;
        if (random && (i / 32 == slow_sg) != (pass == 1)) continue;
        g.cur = i;
        ctx_switch(g.sched, g.fibers[i].ctx);
        progressed = true;
      }
    }
    if (random && g.tg_gen != phase) {
      phase = g.tg_gen;
      slow_sg = int(next_random() % uint64_t(nsg));
    }
    if (g.aborted) break;
    if (!progressed) {
      std::string msg = "deadlock in threadgroup (" + std::to_string(bx) + "," +
                        std::to_string(by) + "," + std::to_string(bz) +
                        "): no thread can make progress. Waiting threads:";
      int shown = 0;
      for (int i = 0; i < n && shown < 8; ++i) {
        if (g.fibers[i].state == DONE) continue;
        msg += "\n  thread_index_in_threadgroup=" + std::to_string(i) + " at " +
               state_name(g.fibers[i].state);
        shown++;
      }
      msg += "\n(a barrier or simd collective reached by only some of the "
             "threads that must take part: divergent control flow?)";
      g.error = msg;
      g.aborted = true;
      break;
    }
  }
  tl_group = nullptr;
  if (g.aborted) {
    std::lock_guard<std::mutex> lk(L.err_mu);
    if (L.error.empty()) L.error = g.error;
    L.failed = true;
    return false;
  }
  return true;
}

static void worker(Launch& L, long total, int tgsize) {
  GroupCtx g;
  g.stack_size = L.stack_size;
  g.stacks_bytes = g.stack_size * size_t(tgsize);
  void* m = mmap(nullptr, g.stacks_bytes, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (m == MAP_FAILED) {
    std::lock_guard<std::mutex> lk(L.err_mu);
    L.error = "could not allocate fiber stacks";
    L.failed = true;
    return;
  }
  g.stacks = static_cast<char*>(m);
  for (int i = 0; i < tgsize; ++i) // guard page below every stack
    mprotect(g.stacks + size_t(i) * g.stack_size, 4096, PROT_NONE);
  g.fibers.resize(tgsize);
  g.arena = static_cast<unsigned char*>(std::aligned_alloc(64, kArenaBytes));
  std::memset(g.arena, 0xFF, kArenaBytes);
  while (!L.failed) {
    long gid = L.next.fetch_add(1);
    if (gid >= total) break;
    if (!run_group(g, L, gid)) break;
  }
}

} // namespace mtl_rt

extern "C" int mtl_launch(mtl_rt::BodyFn body, void** args, const long* dims,
                          int nworkers, long stack_size, int schedule, int private_tg,
                          const void* const* reg_lo, const long* reg_bytes,
                          const char* const* reg_names, const int* reg_kinds, int nreg,
                          char* err, int errlen) {
  mtl_rt::Launch L;
  for (int i = 0; i < nreg; ++i) {
    const unsigned char* lo = static_cast<const unsigned char*>(reg_lo[i]);
    L.regions.push_back(mtl_rt::Region{lo, lo + reg_bytes[i], reg_names[i], reg_kinds[i]});
  }
  L.body = body;
  L.args = args;
  L.schedule = schedule;
  L.private_tg = private_tg != 0;
  long total = 1;
  for (int d = 0; d < 3; ++d) {
    L.grid[d] = dims[d];
    L.tg[d] = std::min(dims[3 + d], dims[d]); // MLX: min(threadgroup, grid)
    if (L.grid[d] <= 0) return 0;
    L.ngroups[d] = (L.grid[d] + L.tg[d] - 1) / L.tg[d];
    total *= L.ngroups[d];
  }
  int tgsize = int(L.tg[0] * L.tg[1] * L.tg[2]);
  L.stack_size = size_t(stack_size);
  int w = int(std::max(1L, std::min<long>(nworkers, total)));
  std::vector<std::thread> ts;
  for (int i = 1; i < w; ++i)
    ts.emplace_back([&] { mtl_rt::worker(L, total, tgsize); });
  mtl_rt::worker(L, total, tgsize);
  for (auto& t : ts) t.join();
  if (L.failed) {
    std::snprintf(err, size_t(errlen), "%s", L.error.c_str());
    return 1;
  }
  return 0;
}
