// Grouped matrix multiplication for XLA:CPU, called through the XLA FFI.
//
// out[r] = lhs[r] @ rhs[g] for every row r of group g. Rows are sorted by group: the first
// group_sizes[0] rows belong to group 0, the next group_sizes[1] to group 1, and so on.
// Rows past sum(group_sizes) are zero. A second handler computes the weight gradient of
// the same product for the backward pass. Only float32 is handled here; the Python side
// chooses another backend for other dtypes.
//
// Work is cut into tasks of (group, block of rows, block of columns). The calling thread
// and the workers it schedules on XLA's intra-op thread pool take tasks from one atomic
// counter, so every core works on one call whatever the group sizes are. Each task walks
// its columns in panels of NV vectors and, inside a panel, its rows in register tiles of
// MR rows. The panel of weights (D x NV vectors) stays in the L2 cache while every row
// tile of the block passes over it.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#if defined(__AVX512F__)
constexpr int kLanes = 16;
constexpr int kAccumulators = 24;  // of 32 vector registers
#elif defined(__AVX__)
constexpr int kLanes = 8;
constexpr int kAccumulators = 12;  // of 16 vector registers
#else
constexpr int kLanes = 4;
constexpr int kAccumulators = 12;
#endif
constexpr int kMaxTileRows = 6;
constexpr int64_t kBlockRows = 48;

typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));

inline Vec Load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(Vec));
  return v;
}

inline void Store(float* p, Vec v) { std::memcpy(p, &v, sizeof(Vec)); }

// Vectors per column panel: a full tile keeps kMaxTileRows x kPanelVectors accumulators.
// Blocks of at most kWideRows rows (decode) use panels twice as wide, so that they read
// each weight row in longer contiguous runs.
constexpr int kPanelVectors = kAccumulators / kMaxTileRows;
constexpr int64_t kPanelWidth = kPanelVectors * kLanes;
constexpr int kWideRows = 2;

// Rows of the next weight panel to prefetch while a tile runs: every `stride`-th row from
// `phase`. The row tiles of one panel take phases 0, 1, ..., so together they fetch the
// whole next panel, spread over the time the current panel takes.
struct Prefetch {
  const float* panel = nullptr;
  int64_t rows = 0;  // rows of the next panel; none past them is touched
  int64_t phase = 0;
  int64_t stride = 1;
};

// c[MR x NV*kLanes] = a[MR x k] @ b[k x NV*kLanes], accumulators in registers.
template <int MR, int NV>
inline void MultiplyTile(const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
                         int64_t ldc, int64_t k, Prefetch ahead) {
  Vec acc[MR][NV] = {};
  int64_t countdown = ahead.panel != nullptr ? ahead.phase : k;
  for (int64_t p = 0; p < k; ++p) {
    Vec bv[NV];
    for (int j = 0; j < NV; ++j) bv[j] = Load(b + p * ldb + j * kLanes);
    if (countdown-- == 0) {
      if (p < ahead.rows) {
        for (int j = 0; j < NV; ++j) __builtin_prefetch(ahead.panel + p * ldb + j * kLanes);
      }
      countdown = ahead.stride - 1;
    }
    for (int i = 0; i < MR; ++i) {
      const float ai = a[i * lda + p];
      for (int j = 0; j < NV; ++j) acc[i][j] += ai * bv[j];
    }
  }
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < NV; ++j) Store(c + i * ldc + j * kLanes, acc[i][j]);
  }
}

// Columns [col, col_end) of MR rows: wide panels, then single vectors, then scalars. The
// first wide panel runs the prefetch.
template <int MR, int NV>
void MultiplyRows(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc,
                  int64_t k, int64_t col, int64_t col_end, Prefetch ahead) {
  for (; col + NV * kLanes <= col_end; col += NV * kLanes, ahead = Prefetch{}) {
    MultiplyTile<MR, NV>(a, lda, b + col, ldb, c + col, ldc, k, ahead);
  }
  for (; col + kLanes <= col_end; col += kLanes) {
    MultiplyTile<MR, 1>(a, lda, b + col, ldb, c + col, ldc, k, Prefetch{});
  }
  for (; col < col_end; ++col) {
    for (int i = 0; i < MR; ++i) {
      float sum = 0.0f;
      for (int64_t p = 0; p < k; ++p) sum += a[i * lda + p] * b[p * ldb + col];
      c[i * ldc + col] = sum;
    }
  }
}

using RowsFn = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t, int64_t,
                        int64_t, int64_t, Prefetch);
constexpr RowsFn kRowsFns[kMaxTileRows + 1] = {
    nullptr,
    MultiplyRows<1, kPanelVectors>,
    MultiplyRows<2, kPanelVectors>,
    MultiplyRows<3, kPanelVectors>,
    MultiplyRows<4, kPanelVectors>,
    MultiplyRows<5, kPanelVectors>,
    MultiplyRows<6, kPanelVectors>,
};
constexpr RowsFn kWideRowsFns[kWideRows + 1] = {
    nullptr,
    MultiplyRows<1, 2 * kPanelVectors>,
    MultiplyRows<2, 2 * kPanelVectors>,
};

// One block of output rows c[rows x cols] = a[rows x k] @ b[k x cols], for the columns
// [col_begin, col_end). The leading dimensions are the problem's.
struct Task {
  const float* a;
  const float* b;
  float* c;
  int64_t rows;
  int64_t k;
  int64_t col_begin;
  int64_t col_end;
};

struct Problem {
  int64_t lda, ldb, ldc;
  std::vector<Task> tasks;
  int64_t batch = 1;  // tasks taken at a time
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

// Multiply one task's columns panel by panel, and inside a panel its rows in tiles of
// kMaxTileRows. The row tiles of each panel prefetch the next panel, or the first panel of
// `next` (this thread's next task, when known), so memory reads overlap the math.
void RunTask(const Problem& problem, const Task& task, const Task* next) {
  const int64_t lda = problem.lda, ldb = problem.ldb, ldc = problem.ldc;
  const bool wide = task.rows <= kWideRows;
  const int64_t panel_width = wide ? 2 * kPanelWidth : kPanelWidth;
  const RowsFn* rows_fns = wide ? kWideRowsFns : kRowsFns;
  for (int64_t col = task.col_begin; col < task.col_end; col += panel_width) {
    const int64_t col_end = std::min(col + panel_width, task.col_end);
    Prefetch ahead;
    if (col_end < task.col_end) {
      ahead = {task.b + col_end, task.k};
    } else if (next != nullptr) {
      ahead = {next->b + next->col_begin, next->k};
    }
    const int64_t tiles = (task.rows + kMaxTileRows - 1) / kMaxTileRows;
    for (int64_t tile = 0; tile < tiles; ++tile) {
      const int64_t row = tile * kMaxTileRows;
      const int64_t rows = std::min<int64_t>(kMaxTileRows, task.rows - row);
      rows_fns[rows](task.a + row * lda, lda, task.b, ldb, task.c + row * ldc, ldc, task.k, col, col_end,
                     Prefetch{ahead.panel, ahead.rows, tile, tiles});
    }
  }
}

// Take runs of `batch` consecutive tasks until none are left. Inside a run, each task
// prefetches the weights of the one after it.
void Drain(Problem& problem) {
  const int64_t total = static_cast<int64_t>(problem.tasks.size());
  const int64_t batch = problem.batch;
  for (int64_t i = problem.next.fetch_add(batch); i < total; i = problem.next.fetch_add(batch)) {
    const int64_t end = std::min(i + batch, total);
    for (int64_t t = i; t < end; ++t) {
      RunTask(problem, problem.tasks[t], t + 1 < end ? &problem.tasks[t + 1] : nullptr);
    }
    problem.done.fetch_add(end - i, std::memory_order_release);
  }
}

// Row ranges of the groups: group g owns rows [starts[g], starts[g] + counts[g]). Each size
// is clamped to [0, rows left], so sizes past the row count or negative never read out of bounds.
struct GroupRows {
  std::vector<int64_t> starts, counts;
  int64_t covered = 0;
};

GroupRows SplitRows(const int32_t* sizes, int64_t groups, int64_t rows) {
  GroupRows split;
  split.starts.resize(groups);
  split.counts.resize(groups);
  for (int64_t g = 0; g < groups; ++g) {
    split.starts[g] = split.covered;
    split.counts[g] = std::clamp<int64_t>(sizes[g], 0, rows - split.covered);
    split.covered += split.counts[g];
  }
  return split;
}

// Column blocks per row block: while there are fewer than four tasks per thread, split the
// columns too, so that small calls still use every thread. Returns the block width.
int64_t ColumnStep(int64_t row_blocks, int64_t width, int64_t threads) {
  int64_t col_blocks = 1;
  while (row_blocks * col_blocks < 4 * threads && width / (2 * col_blocks) >= 4 * kLanes) {
    col_blocks *= 2;
  }
  return std::max<int64_t>(kLanes, ((width + col_blocks - 1) / col_blocks + kLanes - 1) / kLanes * kLanes);
}

// Add the tasks of an output block of `rows` rows, cut into blocks of kBlockRows rows.
void AddTasks(std::vector<Task>& tasks, const float* a, int64_t lda, const float* b, float* c, int64_t ldc,
              int64_t rows, int64_t k, int64_t width, int64_t col_step) {
  for (int64_t r = 0; r < rows; r += kBlockRows) {
    for (int64_t col = 0; col < width; col += col_step) {
      tasks.push_back({a + r * lda, b, c + r * ldc, std::min(kBlockRows, rows - r), k, col,
                       std::min(col + col_step, width)});
    }
  }
}

// Run every task on the calling thread and up to num_threads - 1 pool workers.
void Run(ffi::ThreadPool& pool, std::shared_ptr<Problem> problem, int64_t threads) {
  const int64_t total = static_cast<int64_t>(problem->tasks.size());
  // Runs of up to 8 tasks, while every thread still gets at least 8 runs to balance the load.
  problem->batch = std::clamp<int64_t>(total / (8 * threads), 1, 8);
  // A worker that starts after every task is taken returns at once without touching a
  // buffer. It keeps the problem alive through the shared pointer, so it may outlive the call.
  const int64_t helpers = std::min<int64_t>(threads, total) - 1;
  for (int64_t i = 0; i < helpers; ++i) {
    pool.Schedule([problem] { Drain(*problem); });
  }
  Drain(*problem);
  while (problem->done.load(std::memory_order_acquire) < total) std::this_thread::yield();
}

int64_t Threads(ffi::ThreadPool& pool) { return std::max<int64_t>(1, pool.num_threads()); }

int64_t RowBlocks(const GroupRows& split) {
  int64_t blocks = 0;
  for (int64_t count : split.counts) blocks += (count + kBlockRows - 1) / kBlockRows;
  return blocks;
}

// out[S, F]: the rows of group g times rhs[g]; rows past the groups are zero.
ffi::Error GroupedMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> lhs, ffi::Buffer<ffi::F32> rhs,
                         ffi::Buffer<ffi::S32> group_sizes, ffi::ResultBuffer<ffi::F32> out) {
  const auto lhs_dims = lhs.dimensions();
  const auto rhs_dims = rhs.dimensions();
  if (lhs_dims.size() != 2 || rhs_dims.size() != 3 || group_sizes.dimensions().size() != 1 ||
      lhs_dims[1] != rhs_dims[1] || group_sizes.dimensions()[0] != rhs_dims[0]) {
    return ffi::Error::InvalidArgument("expected lhs [S, D], rhs [G, D, F] and group_sizes [G]");
  }
  const int64_t rows = lhs_dims[0], groups = rhs_dims[0], depth = rhs_dims[1], width = rhs_dims[2];
  const GroupRows split = SplitRows(group_sizes.typed_data(), groups, rows);
  float* c = out->typed_data();
  std::memset(c + split.covered * width, 0, (rows - split.covered) * width * sizeof(float));

  auto problem = std::make_shared<Problem>();
  problem->lda = depth;
  problem->ldb = width;
  problem->ldc = width;
  const int64_t threads = Threads(pool);
  const int64_t col_step = ColumnStep(RowBlocks(split), width, threads);
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t first = split.starts[g];
    AddTasks(problem->tasks, lhs.typed_data() + first * depth, depth, rhs.typed_data() + g * depth * width,
             c + first * width, width, split.counts[g], depth, width, col_step);
  }
  Run(pool, problem, threads);
  return ffi::Error::Success();
}

// grad_rhs[G, D, F]: grad_rhs[g] = (rows of group g)^T @ (d out rows of group g). It reads
// the transposed lhs [D, S], in which each group's values are contiguous within every row.
ffi::Error GroupedMatmulRhsGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> lhs_t, ffi::Buffer<ffi::F32> dout,
                                ffi::Buffer<ffi::S32> group_sizes, ffi::ResultBuffer<ffi::F32> grad_rhs) {
  const auto lhs_dims = lhs_t.dimensions();
  const auto dout_dims = dout.dimensions();
  const auto grad_dims = grad_rhs->dimensions();
  if (lhs_dims.size() != 2 || dout_dims.size() != 2 || grad_dims.size() != 3 ||
      group_sizes.dimensions().size() != 1 || lhs_dims[1] != dout_dims[0] || grad_dims[0] != group_sizes.dimensions()[0] ||
      grad_dims[1] != lhs_dims[0] || grad_dims[2] != dout_dims[1]) {
    return ffi::Error::InvalidArgument("expected lhs^T [D, S], d out [S, F], group_sizes [G] and d rhs [G, D, F]");
  }
  const int64_t depth = lhs_dims[0], rows = lhs_dims[1], groups = grad_dims[0], width = dout_dims[1];
  const GroupRows split = SplitRows(group_sizes.typed_data(), groups, rows);

  auto problem = std::make_shared<Problem>();
  problem->lda = rows;
  problem->ldb = width;
  problem->ldc = width;
  const int64_t threads = Threads(pool);
  const int64_t col_step = ColumnStep(groups * ((depth + kBlockRows - 1) / kBlockRows), width, threads);
  for (int64_t g = 0; g < groups; ++g) {
    // A group without rows gets k = 0 and so a zero gradient.
    const int64_t first = split.starts[g];
    AddTasks(problem->tasks, lhs_t.typed_data() + first, rows, dout.typed_data() + first * width,
             grad_rhs->typed_data() + g * depth * width, width, depth, split.counts[g], width, col_step);
  }
  Run(pool, problem, threads);
  return ffi::Error::Success();
}

// Both handlers take the thread pool, two float32 operands and int32 group sizes, and
// return one float32 buffer.
auto GroupedBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::S32>>()
      .Ret<ffi::Buffer<ffi::F32>>();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PrismGroupedMatmulF32, GroupedMatmul, GroupedBinding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(PrismGroupedMatmulRhsGradF32, GroupedMatmulRhsGrad, GroupedBinding());
