#pragma once
/// \file
/// attn::pattern — a sparse attention pattern resolved for one sequence length and one head.
///
/// Every built-in policy (dense, local_window, dilated, global_tokens, their unions and hsa) binds to a
/// `pattern` at run time (`policy.bind(n, head)`). The pattern is the one place that knows how the
/// pieces combine: it defines the mask, the disjoint passes and which pass owns each pair, the keys of
/// 64×64 blocks (the block path every policy offers), and what each pass offers the kernels
/// (capabilities.hpp). Its segment path — query tiles and the strided key segments each visits, the
/// path the kernels take — is `attn::tiled_pattern`, the pattern in tiles of a height the backend
/// chooses (`pattern::tiles(rows)`): the semantic pattern holds no tile. See docs/attention.md.

#include <drdiff/attention/capabilities.hpp>
#include <drdiff/attention/index_range.hpp>
#include <drdiff/core/config.hpp>

DRDIFF_NAMESPACE_BEGIN
namespace attn {

/// How global tokens are chosen.
enum class global_rule : int {
  none = 0,     ///< no global tokens
  first = 1,    ///< positions 0 .. G−1
  strided = 2,  ///< positions k·⌊N/G⌋, k = 0 .. G−1
  list = 3      ///< an explicit, strictly increasing list of positions
};

/// One dilated component: keys j with |i − j| ≤ span and (i − j) mod rate = 0.
struct dilation {
  int rate = 1;
  int span = 0;
};

/// Most dilated components one pattern (or union) can hold.
inline constexpr int max_dilations = 4;

/// The kinds of pass a pattern runs; each (query, key) pair belongs to exactly one pass.
enum class pass_kind : int {
  dense_rows,    ///< dense pattern: every row, every key
  global_rows,   ///< global query rows: every key
  window_band,   ///< |i − j| ≤ window (non-global rows)
  dilated,       ///< one dilated component, minus the window and earlier components
  global_keys    ///< global keys not already covered by the window or a dilation
};

struct tiled_pattern;

/// A pattern bound to one sequence length `n` (and one head). Trivially copyable; the global list,
/// when used, is borrowed (host memory on the CPU backend, device memory on the CUDA backend).
struct pattern {
  /// Semantic block size of the block path.
  static constexpr int block_q = 64;
  static constexpr int block_k = 64;

  int n = 0;               ///< sequence length
  bool is_dense = false;   ///< every pair allowed
  int window = -1;         ///< local half-width w; −1: no window
  int num_dilations = 0;   ///< dilated components in `dil`
  dilation dil[max_dilations] = {};
  global_rule rule = global_rule::none;
  int num_global = 0;      ///< G
  int global_stride = 1;   ///< rule == strided: ⌊N/G⌋
  int const* global_list = nullptr;  ///< rule == list: G sorted positions

  // ---- the definition ------------------------------------------------------------------------

  DRDIFF_HOST_DEVICE constexpr bool is_global(int i) const noexcept {
    switch (rule) {
      case global_rule::first: return i < num_global;
      case global_rule::strided: return i % global_stride == 0 && i / global_stride < num_global;
      case global_rule::list: {
        int lo = 0, hi = num_global;
        while (lo < hi) {
          int const mid = lo + (hi - lo) / 2;
          if (global_list[mid] < i) lo = mid + 1; else hi = mid;
        }
        return lo < num_global && global_list[lo] == i;
      }
      default: return false;
    }
  }
  DRDIFF_HOST_DEVICE constexpr bool in_window(int i, int j) const noexcept {
    int const d = i > j ? i - j : j - i;
    return d <= window;  // window == −1 never matches
  }
  DRDIFF_HOST_DEVICE constexpr bool in_dilation(int c, int i, int j) const noexcept {
    int const d = i > j ? i - j : j - i;
    return d <= dil[c].span && d % dil[c].rate == 0;
  }
  DRDIFF_HOST_DEVICE constexpr bool in_any_dilation(int i, int j, int below = max_dilations) const noexcept {
    for (int c = 0; c < num_dilations && c < below; ++c)
      if (in_dilation(c, i, j)) return true;
    return false;
  }
  /// The mask: true when query i attends key j (0 ≤ i, j < n).
  DRDIFF_HOST_DEVICE constexpr bool mask(int i, int j) const noexcept {
    if (is_dense) return true;
    return in_window(i, j) || in_any_dilation(i, j) || is_global(i) || is_global(j);
  }
  /// Positions of the global tokens as an index range.
  DRDIFF_HOST_DEVICE constexpr index_range global_keys() const noexcept {
    switch (rule) {
      case global_rule::first: return index_range{0, 1, num_global, nullptr};
      case global_rule::strided: return index_range{0, global_stride, num_global, nullptr};
      case global_rule::list: return index_range{0, 1, num_global, global_list};
      default: return index_range{};
    }
  }
  /// Largest |i − j| reached by the window or a dilation (−1 when neither exists).
  DRDIFF_HOST_DEVICE constexpr int reach() const noexcept {
    int r = window;
    for (int c = 0; c < num_dilations; ++c) r = dil[c].span > r ? dil[c].span : r;
    return r;
  }

  // ---- the segment path: passes, query tiles, key segments ------------------------------------

  DRDIFF_HOST_DEVICE constexpr int num_passes() const noexcept {
    if (is_dense) return 1;
    int const g = num_global > 0 ? 2 : 0;
    return g + (window >= 0 ? 1 : 0) + num_dilations;
  }
  /// Kind of pass `p`; for pass_kind::dilated, `component` receives the dilation index.
  DRDIFF_HOST_DEVICE constexpr pass_kind kind(int p, int* component = nullptr) const noexcept {
    if (is_dense) return pass_kind::dense_rows;
    if (num_global > 0) {
      if (p == 0) return pass_kind::global_rows;
      --p;
    }
    if (window >= 0) {
      if (p == 0) return pass_kind::window_band;
      --p;
    }
    if (p >= 0 && p < num_dilations) {
      if (component) *component = p;
      return pass_kind::dilated;
    }
    return pass_kind::global_keys;
  }
  /// First row processed by the non-global passes (rows below it are all global rows).
  DRDIFF_HOST_DEVICE constexpr int first_plain_row() const noexcept {
    return rule == global_rule::first ? (num_global < n ? num_global : n) : 0;
  }
  /// True when query i attends key j and pass p owns the pair.
  DRDIFF_HOST_DEVICE constexpr bool owns(int p, int i, int j) const noexcept {
    int c = 0;
    switch (kind(p, &c)) {
      case pass_kind::dense_rows: return true;
      case pass_kind::global_rows: return is_global(i);
      case pass_kind::window_band: return in_window(i, j) && !is_global(i);
      case pass_kind::dilated:
        return in_dilation(c, i, j) && !in_window(i, j) && !in_any_dilation(i, j, c) && !is_global(i);
      default:
        return is_global(j) && !in_window(i, j) && !in_any_dilation(i, j) && !is_global(i);
    }
  }
  /// `owns` for a key j taken from a segment of pass kind k (component c) and a row i that is not
  /// global: the checks the segment already guarantees (phase, global key) are skipped. Kernels
  /// hoist kind() and is_global(i) out of their element loops and call this.
  DRDIFF_HOST_DEVICE constexpr bool owns_segment_key(pass_kind k, int c, int i, int j) const noexcept {
    int const d = i > j ? i - j : j - i;
    switch (k) {
      case pass_kind::window_band: return d <= window;
      case pass_kind::dilated: return d > window && d <= dil[c].span && (c == 0 || !in_any_dilation(i, j, c));
      case pass_kind::global_keys: return d > window && !in_any_dilation(i, j);
      default: return true;
    }
  }
  /// The key segment of the global-key pass for any non-empty, increasing set of rows (the pass's own
  /// tiles, or the rows of another pass's tile when a backend runs both passes in one): `f(keys,
  /// exact)` once. Exact when no row is global and no global key is within reach of the rows (then
  /// no window or dilation can own a global key of these rows).
  DRDIFF_EXEC_CHECK_DISABLE
  template <class F>
  DRDIFF_HOST_DEVICE constexpr void global_key_segment(index_range rows, F&& f) const {
    index_range const g = global_keys();
    bool exact = !any_global_row(rows);
    int const r = reach();
    if (exact && r >= 0) {
      long long const lo = static_cast<long long>(rows.start) - r;
      long long const hi = static_cast<long long>(rows[rows.count - 1]) + r;
      int const below_lo = lo <= 0 ? 0 : g.count_below(static_cast<int>(lo));
      int const upto_hi = hi >= n ? g.count : g.count_below(static_cast<int>(hi) + 1);
      exact = upto_hi == below_lo;
    }
    f(g, exact);
  }
  /// The segment of key-tail pass `pass` (the global keys) for rows of a tile of pass − 1
  /// (capability; attention/capabilities.hpp).
  DRDIFF_EXEC_CHECK_DISABLE
  template <class F>
  DRDIFF_HOST_DEVICE constexpr void tail_segment(int, index_range rows, F&& f) const {
    global_key_segment(rows, f);
  }

  // ---- capabilities (attention/capabilities.hpp) ------------------------------------------------

  struct pass_ref;
  /// The view of pass p: its kind, computed once, and what it offers the backends.
  DRDIFF_HOST_DEVICE constexpr pass_ref pass_view(int p) const noexcept;

  /// The same pattern (for sharing one bound pattern between heads): every field that defines it.
  DRDIFF_HOST_DEVICE friend constexpr bool operator==(pattern const& a, pattern const& b) noexcept {
    if (a.n != b.n || a.is_dense != b.is_dense || a.window != b.window || a.num_dilations != b.num_dilations ||
        a.rule != b.rule || a.num_global != b.num_global || a.global_stride != b.global_stride ||
        a.global_list != b.global_list)
      return false;
    for (int c = 0; c < a.num_dilations; ++c)
      if (a.dil[c].rate != b.dil[c].rate || a.dil[c].span != b.dil[c].span) return false;
    return true;
  }
  DRDIFF_HOST_DEVICE friend constexpr bool operator!=(pattern const& a, pattern const& b) noexcept { return !(a == b); }

  /// The segment path of this pattern in query tiles of `rows` rows (the backend's choice).
  DRDIFF_HOST_DEVICE constexpr tiled_pattern tiles(int rows) const noexcept;

  // ---- the block path (block_q × block_k blocks) ----------------------------------------------

  DRDIFF_HOST_DEVICE constexpr int num_blocks_k() const noexcept { return (n + block_k - 1) / block_k; }
  DRDIFF_HOST_DEVICE constexpr int num_kv_blocks(int qb) const noexcept {
    block_plan const b = plan(qb);
    return b.all ? num_blocks_k() : b.below + b.band_count + b.above;
  }
  /// The i-th key block visited by query block qb, in increasing order.
  DRDIFF_HOST_DEVICE constexpr int kv_block(int qb, int i) const noexcept {
    block_plan const b = plan(qb);
    if (b.all) return i;
    if (i < b.below) return global_block(i);
    if (i < b.below + b.band_count) return b.band_lo + (i - b.below);
    return global_block(b.first_above + (i - b.below - b.band_count));
  }
  /// True when every (q, k) of the block pair is allowed (a hint: false is always safe).
  DRDIFF_HOST_DEVICE constexpr bool full_block(int qb, int kb) const noexcept {
    if (is_dense) return true;
    int const q0 = qb * block_q, q1 = min_(n, q0 + block_q);
    int const k0 = kb * block_k, k1 = min_(n, k0 + block_k);
    if (q0 >= q1 || k0 >= k1) return false;
    if (rule == global_rule::first && (q1 <= num_global || k1 <= num_global)) return true;
    return window >= 0 && q1 - 1 - k0 <= window && k1 - 1 - q0 <= window;
  }

 protected:
  DRDIFF_HOST_DEVICE static constexpr int min_(int a, int b) noexcept { return a < b ? a : b; }
  DRDIFF_HOST_DEVICE static constexpr int max_(int a, int b) noexcept { return a > b ? a : b; }

  DRDIFF_HOST_DEVICE constexpr bool any_global_row(index_range rows) const noexcept {
    if (num_global == 0) return false;
    if (rule == global_rule::first) return rows.start < num_global;
    for (int r = 0; r < rows.count; ++r)
      if (is_global(rows[r])) return true;
    return false;
  }

  /// Rows a ∈ [a0, a1) (phase coordinates), keys b ∈ [0, nb) with lo ≤ |a − b| ≤ hi: emits the
  /// keys in maximal runs, each marked exact (all rows allowed, and `clean`) or masked; keys no row
  /// allows are skipped. Absolute position of phase index b is phase + rate·b.
  DRDIFF_EXEC_CHECK_DISABLE
  template <class F>
  DRDIFF_HOST_DEVICE static constexpr void ring(int phase, int rate, int a0, int a1, int lo, int hi,
                                                int nb, bool clean, F& f) {
    int const first = max_(0, a0 - hi), last = min_(nb - 1, a1 - 1 + hi);
    if (first > last) return;
    // Allowed-row counts change slope only at these keys; classify each elementary interval once.
    int cuts[18] = {};
    int nc = 0;
    int const bps[8] = {a0 - hi, a1 - 1 - hi, a0 - lo, a1 - 1 - lo,
                        a0 + lo, a1 - 1 + lo, a0 + hi, a1 - 1 + hi};
    cuts[nc++] = first;
    cuts[nc++] = last + 1;
    for (int x : bps) {
      if (x > first && x <= last) cuts[nc++] = x;
      if (x + 1 > first && x + 1 <= last) cuts[nc++] = x + 1;
    }
    for (int x = 1; x < nc; ++x)  // insertion sort, ≤ 18 values
      for (int y = x; y > 0 && cuts[y - 1] > cuts[y]; --y) {
        int const tmp = cuts[y]; cuts[y] = cuts[y - 1]; cuts[y - 1] = tmp;
      }
    int run_start = -1, run_class = 0;  // class: 1 = exact, 2 = masked
    for (int x = 0; x + 1 < nc; ++x) {
      int const b0 = cuts[x], b1 = cuts[x + 1];
      if (b0 >= b1) continue;
      int const allowed = rows_allowed(b0, a0, a1, lo, hi);
      int const cls = allowed == 0 ? 0 : (allowed == a1 - a0 && clean ? 1 : 2);
      if (cls != run_class) {
        if (run_class != 0) f(index_range{phase + rate * run_start, rate, b0 - run_start, nullptr}, run_class == 1);
        run_start = b0;
        run_class = cls;
      }
    }
    if (run_class != 0) f(index_range{phase + rate * run_start, rate, last + 1 - run_start, nullptr}, run_class == 1);
  }
  /// Number of rows a ∈ [a0, a1) with lo ≤ |a − b| ≤ hi.
  DRDIFF_HOST_DEVICE static constexpr int rows_allowed(int b, int a0, int a1, int lo, int hi) noexcept {
    auto overlap = [](int x0, int x1, int y0, int y1) {  // |[x0, x1] ∩ [y0, y1]|
      int const l = x0 > y0 ? x0 : y0, h = x1 < y1 ? x1 : y1;
      return h >= l ? h - l + 1 : 0;
    };
    if (lo == 0) return overlap(a0, a1 - 1, b - hi, b + hi);
    return overlap(a0, a1 - 1, b - hi, b - lo) + overlap(a0, a1 - 1, b + lo, b + hi);
  }

  /// Key blocks holding global tokens, as a monotone sequence.
  DRDIFF_HOST_DEVICE constexpr int num_global_blocks() const noexcept {
    switch (rule) {
      case global_rule::first: return (num_global + block_k - 1) / block_k;
      case global_rule::strided:
        return global_stride >= block_k ? num_global : (num_global - 1) * global_stride / block_k + 1;
      case global_rule::list: {
        int cnt = 0, prev = -1;
        for (int g = 0; g < num_global; ++g) {
          int const b = global_list[g] / block_k;
          if (b != prev) { ++cnt; prev = b; }
        }
        return cnt;
      }
      default: return 0;
    }
  }
  DRDIFF_HOST_DEVICE constexpr int global_block(int k) const noexcept {
    switch (rule) {
      case global_rule::strided: return global_stride >= block_k ? k * global_stride / block_k : k;
      case global_rule::list: {
        int cnt = -1, prev = -1;
        for (int g = 0; g < num_global; ++g) {
          int const b = global_list[g] / block_k;
          if (b != prev) { ++cnt; prev = b; }
          if (cnt == k) return b;
        }
        return prev;
      }
      default: return k;
    }
  }
  /// Number of global blocks below key block `kb`.
  DRDIFF_HOST_DEVICE constexpr int global_blocks_below(int kb, int total) const noexcept {
    int lo = 0, hi = total;
    while (lo < hi) {
      int const mid = lo + (hi - lo) / 2;
      if (global_block(mid) < kb) lo = mid + 1; else hi = mid;
    }
    return lo;
  }
  struct block_plan {
    bool all = false;
    int below = 0, band_lo = 0, band_count = 0, first_above = 0, above = 0;
  };
  DRDIFF_HOST_DEVICE constexpr block_plan plan(int qb) const noexcept {
    block_plan b{};
    int const q0 = qb * block_q, q1 = min_(n, q0 + block_q);
    if (is_dense || any_global_row(contiguous(q0, q1))) {
      b.all = true;
      return b;
    }
    int const r = reach();
    int band_hi = -1;
    if (r >= 0) {
      b.band_lo = max_(0, q0 - r) / block_k;
      band_hi = min_(n - 1, q1 - 1 + r) / block_k;
      b.band_count = band_hi - b.band_lo + 1;
    }
    int const total = num_global_blocks();
    if (b.band_count == 0) {
      b.below = total;
      return b;
    }
    b.below = global_blocks_below(b.band_lo, total);
    b.first_above = global_blocks_below(band_hi + 1, total);
    b.above = total - b.first_above;
    return b;
  }
};

/// The pass view of attn::pattern: the kind of one pass (no pointer: kernels keep it in registers),
/// and what the pass lets a backend assume.
struct pattern::pass_ref {
  pass_kind kind;
  int comp;  ///< the dilation component of a dilated pass

  DRDIFF_HOST_DEVICE constexpr pass_traits traits(pattern const& pt) const noexcept {
    pass_traits t;
    switch (kind) {
      case pass_kind::dense_rows: t.dense = true; break;
      case pass_kind::global_rows: t.key_split = true; break;
      case pass_kind::window_band:  // a tile of consecutive rows sees keys [r0 − w, r1 − 1 + w]
        t.one_run = true;
        t.band_lo = 0;
        t.band_hi = pt.window;
        break;
      case pass_kind::dilated:  // the first component owns its phase's keys at w < |i − j| ≤ span
        if (comp == 0) {
          t.band_lo = pt.window + 1;
          t.band_hi = pt.dil[0].span;
        }
        break;
      case pass_kind::global_keys: t.key_tail = true; break;
    }
    return t;
  }
  /// Global rows have keys only in the global-row pass.
  DRDIFF_HOST_DEVICE constexpr bool live_row(pattern const& pt, int i) const noexcept {
    return kind == pass_kind::global_rows || !pt.is_global(i);
  }
  DRDIFF_HOST_DEVICE constexpr bool owns_key(pattern const& pt, int i, int j) const noexcept {
    return pt.owns_segment_key(kind, comp, i, j);
  }
  /// The global-key pass, which rides as the tail of the last other ordinary pass.
  DRDIFF_HOST_DEVICE constexpr pass_ref tail() const noexcept { return {pass_kind::global_keys, comp}; }
};

DRDIFF_HOST_DEVICE constexpr pattern::pass_ref pattern::pass_view(int p) const noexcept {
  int c = 0;
  pass_kind const k = kind(p, &c);
  return {k, c};
}

/// The segment path of a pattern: the pattern walked in query tiles of `tile` rows, a choice of the
/// backend (pattern::tiles(rows); 64 unless a backend asks for another). Passes, ownership and the
/// capabilities are the pattern's; this adds the query tiles, the key segments of each tile and the
/// row form of owns() that the CPU kernel uses.
struct tiled_pattern : pattern {
  int tile = 64;  ///< query rows per tile

  /// Query tiles per dilation phase for component c (every phase gets the same count; short phases
  /// end with empty tiles).
  DRDIFF_HOST_DEVICE constexpr int phase_tiles(int c) const noexcept {
    int const rows = n - first_plain_row();
    int const per_phase = (rows + dil[c].rate - 1) / dil[c].rate;  // rows of phase 0, the longest
    return (per_phase + tile - 1) / tile;
  }
  DRDIFF_HOST_DEVICE constexpr int num_q_tiles(int p) const noexcept {
    int c = 0;
    switch (kind(p, &c)) {
      case pass_kind::dense_rows: return (n + tile - 1) / tile;
      case pass_kind::global_rows: return (num_global + tile - 1) / tile;
      case pass_kind::dilated: return dil[c].rate * phase_tiles(c);
      default: return (n - first_plain_row() + tile - 1) / tile;
    }
  }
  /// Query rows of tile t of pass p (possibly empty).
  DRDIFF_HOST_DEVICE constexpr index_range q_tile(int p, int t) const noexcept {
    int c = 0;
    switch (kind(p, &c)) {
      case pass_kind::dense_rows: return contiguous(t * tile, min_(n, t * tile + tile));
      case pass_kind::global_rows: return global_keys().sub(t * tile, min_(tile, num_global - t * tile));
      case pass_kind::dilated: {
        int const rate = dil[c].rate, per = phase_tiles(c);
        if (per == 0) return index_range{};
        int const phase = t / per, chunk = t % per;
        int const r0 = first_plain_row() + phase;  // first row of this phase
        int const rows = r0 < n ? (n - r0 + rate - 1) / rate : 0;
        int const a0 = chunk * tile;
        return index_range{r0 + rate * a0, rate, min_(tile, rows - a0), nullptr};
      }
      default: {
        int const r0 = first_plain_row() + t * tile;
        return contiguous(r0, min_(n, r0 + tile));
      }
    }
  }
  /// Calls `f(index_range keys, bool exact)` for the key segments of tile t of pass p, in increasing
  /// key order, disjoint. `exact` means every pair (row of the tile, key of the segment) is owned by
  /// the pass; otherwise the backend evaluates `owns(p, i, j)` per element. Keys are in [0, n).
  DRDIFF_EXEC_CHECK_DISABLE
  template <class F>
  DRDIFF_HOST_DEVICE constexpr void for_each_segment(int p, int t, F&& f) const {
    index_range const rows = q_tile(p, t);
    if (rows.empty()) return;
    int c = 0;
    switch (kind(p, &c)) {
      case pass_kind::dense_rows:
      case pass_kind::global_rows: f(contiguous(0, n), true); return;
      case pass_kind::window_band: {
        bool const clean = !any_global_row(rows);
        ring(0, 1, rows.start, rows.start + rows.count, 0, window, n, clean, f);
        return;
      }
      case pass_kind::dilated: {
        int const rate = dil[c].rate;
        int const phase = rows.start % rate;
        int const a0 = rows.start / rate;  // rows in phase coordinates: a0 .. a0 + count − 1
        int const lo = window >= 0 ? window / rate + 1 : 0;
        int const hi = dil[c].span / rate;
        if (lo > hi) return;
        int const keys = (n - phase + rate - 1) / rate;  // phase-p keys in [0, n)
        bool const clean = c == 0 && !any_global_row(rows);
        ring(phase, rate, a0, a0 + rows.count, lo, hi, keys, clean, f);
        return;
      }
      default: global_key_segment(rows, f); return;
    }
  }
  /// Row form of `owns` (optional member of the segment interface, used by the CPU kernel):
  /// keep[x] = owns(p, i, keys[x]) for x < keys.count, written as 1/0. Window and dilated passes
  /// write the owned keys of the row as one or two runs (then clear what earlier dilations own)
  /// instead of testing each key; the global-key pass tests each key without the global lookups.
  template <class T>
  DRDIFF_HOST_DEVICE constexpr void row_mask(int p, int i, index_range keys, T* keep) const {
    int c = 0;
    pass_kind const k = kind(p, &c);
    if (k == pass_kind::global_keys) {
      bool const row_global = is_global(i);
      for (int x = 0; x < keys.count; ++x) {
        int const j = keys[x];
        keep[x] = !row_global && !in_window(i, j) && !in_any_dilation(i, j) ? T(1) : T(0);
      }
      return;
    }
    bool const runs = !keys.list && (k == pass_kind::window_band ||
                                     (k == pass_kind::dilated && keys.stride % dil[c].rate == 0 &&
                                      (keys.start - i) % dil[c].rate == 0));
    if (!runs) {
      for (int x = 0; x < keys.count; ++x) keep[x] = owns(p, i, keys[x]) ? T(1) : T(0);
      return;
    }
    for (int x = 0; x < keys.count; ++x) keep[x] = T(0);
    if (is_global(i)) return;
    // Keys j = start + stride·x; owned when lo ≤ |i − j| ≤ hi (window: lo = 0; dilated: past the
    // window, and the segment lies in i's phase so every key is a multiple of the rate away).
    int const lo = k == pass_kind::window_band ? 0 : (window >= 0 ? window + 1 : 0);
    int const hi = k == pass_kind::window_band ? window : dil[c].span;
    // Calls g(x) for the keys x with j0 ≤ keys[x] ≤ j1.
    auto each = [&](long long j0, long long j1, auto&& g) {
      long long const st = keys.stride;
      long long const x0 = j0 <= keys.start ? 0 : (j0 - keys.start + st - 1) / st;
      long long x1 = j1 < keys.start ? -1 : (j1 - keys.start) / st;
      if (x1 >= keys.count) x1 = keys.count - 1;
      for (long long x = x0; x <= x1; ++x) g(static_cast<int>(x));
    };
    auto set = [&](int x) { keep[x] = T(1); };
    long long const ii = i;
    if (lo == 0) {
      each(ii - hi, ii + hi, set);
    } else {
      each(ii - hi, ii - lo, set);
      each(ii + lo, ii + hi, set);
    }
    for (int e = 0; k == pass_kind::dilated && e < c; ++e)  // pairs an earlier dilation owns
      each(ii - dil[e].span, ii + dil[e].span, [&](int x) {
        if (in_dilation(e, i, keys[x])) keep[x] = T(0);
      });
  }

  DRDIFF_HOST_DEVICE friend constexpr bool operator==(tiled_pattern const& a, tiled_pattern const& b) noexcept {
    return static_cast<pattern const&>(a) == static_cast<pattern const&>(b) && a.tile == b.tile;
  }
  DRDIFF_HOST_DEVICE friend constexpr bool operator!=(tiled_pattern const& a, tiled_pattern const& b) noexcept {
    return !(a == b);
  }
};

DRDIFF_HOST_DEVICE constexpr tiled_pattern pattern::tiles(int rows) const noexcept {
  tiled_pattern t{};
  static_cast<pattern&>(t) = *this;
  t.tile = rows;
  return t;
}

}  // namespace attn
DRDIFF_NAMESPACE_END
