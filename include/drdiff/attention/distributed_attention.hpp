#pragma once
/// \file
/// Sequence-parallel attention: `drdiff::distributed_attention(dctx, policy, args, ws, bytes)` runs
/// one attention call whose sequence is split in contiguous chunks over the ranks of a communicator,
/// each rank holding its chunk's q, k, v and o. Portable: the backends provide the element-wise
/// steps (detail::dist_exec: cpu/distributed.hpp, cuda/distributed.cuh) and the communicator moves
/// the bytes (drdiff::cpu_communicator for ranks that are threads of one process; drdiff::
/// nccl_communicator over NCCL, <drdiff/cuda/nccl.cuh>).
///
/// Per call and rank (attn::dist_plan says what goes where):
///   1. the ranks agree on the shapes (one small all-reduce), so bad arguments on one rank make every
///      rank throw instead of leaving the others waiting;
///   2. the halo: each rank sends each neighbour the keys and values of its chunk that the
///      neighbour's non-global rows attend (one send and one receive per neighbour);
///   3. the global tokens' q, k and v: an all-gather;
///   4. the ordinary attention on the rank's frame (its chunk, its halo at their distances, the
///      global tokens as a list): the chunk's non-global rows, exact;
///   5. the global rows over the chunk's own keys, a second attention call, then merged with the
///      other ranks' parts by log-sum-exp (an all-reduce of the maximum, then of the weighted sums).
///
/// The communicator and the backend's steps: core/distributed.hpp.

#include <drdiff/attention/attention.hpp>
#include <drdiff/attention/distributed.hpp>
#include <drdiff/attention/distributed_ops.hpp>
#include <drdiff/attention/policy/global_tokens.hpp>
#include <drdiff/core/backend.hpp>
#include <drdiff/core/distributed.hpp>
#include <drdiff/core/traits.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

DRDIFF_NAMESPACE_BEGIN

/// The arguments of one rank. `chunk` describes this rank's rows as an ordinary call does: chunk.seq
/// is the chunk's length (attn::sequence_chunk(seq, ranks, rank)), q, k, v, o and maybe_lse
/// ([batch, heads, chunk.seq]) hold those rows, and maybe_kv_lens must be null (pad the whole
/// sequence instead). `seq` is the whole sequence's length: the policy binds to it.
template <class T>
struct distributed_attention_args {
  int seq = 0;
  attention_args<T> chunk{};
  /// For a policy whose global tokens are an explicit list in device memory (drdiff::cuda): the same
  /// positions in host memory (the plan is made on the host).
  int const* maybe_host_global_list = nullptr;
};

namespace detail {

/// Where everything of one rank's call lives in its workspace (byte offsets from the aligned start).
template <class T>
struct dist_layout {
  using A = typename attention_args<T>::lse_type;

  int batch = 0, heads = 0, dim = 0, c = 0, G = 0, F = 0;
  int out_rows = 0;    ///< rows of the output buffer: the frame's F, or the part call's c + G
  int frame_rows = 0;  ///< F + G: the frame's q, k, v with room for the global q rows (the part call's)
  std::size_t agree = 0, fq = 0, fk = 0, fv = 0, fo = 0, flse = 0, frame_list = 0, part_list = 0, kv_lens = 0;
  std::size_t send_rows = 0, recv_rows = 0, send_buf = 0, recv_buf = 0;
  std::size_t own_rows = 0, slot_rows = 0, slot_qrows = 0, gsend = 0, grecv = 0;
  std::size_t merge_m = 0, merge_acc = 0, inner = 0, inner_bytes = 0, total = 0;
  std::vector<std::size_t> send_at, recv_at;  ///< per peer: its first row in the packed halo buffers
  std::size_t slot_elems = 0;                 ///< one rank's all-gather slot: q, k, v of its globals

  std::size_t row_elems() const { return std::size_t(heads) * dim; }
};

/// The frame call's and the part call's arguments, at `base` (null: for the workspace query).
template <class T>
struct dist_calls {
  attention_args<T> frame{}, part{};
};

template <class T>
dist_calls<T> dist_make_calls(dist_layout<T> const& l, attn::dist_plan const& plan, unsigned char* base,
                              double softmax_scale) {
  using A = typename dist_layout<T>::A;
  auto at = [&](std::size_t off) { return base ? base + off : nullptr; };
  dist_calls<T> c;
  auto& f = c.frame;
  f.batch = l.batch; f.seq = l.F; f.heads = l.heads; f.head_dim = l.dim;
  f.q = reinterpret_cast<T const*>(at(l.fq));
  f.k = reinterpret_cast<T const*>(at(l.fk));
  f.v = reinterpret_cast<T const*>(at(l.fv));
  f.o = reinterpret_cast<T*>(at(l.fo));
  f.q_strides = f.k_strides = f.v_strides = attn::packed(l.frame_rows, l.heads, l.dim);
  f.o_strides = attn::packed(l.out_rows, l.heads, l.dim);
  f.maybe_lse = reinterpret_cast<A*>(at(l.flse));
  f.softmax_scale = softmax_scale;
  if (l.G > 0) {
    // The part call: its rows [0, c) are the chunk's keys (with kv_len = c nothing past them is
    // attended), its rows [c, c + G) the global rows. Its q starts F − c rows into the frame's q, so
    // that its global rows are the frame's extra rows [F, F + G), where the global q were gathered.
    auto& p = c.part;
    p = f;
    p.seq = l.c + l.G;
    std::int64_t const re = std::int64_t(l.row_elems());
    auto shift = [&](T const* ptr, std::int64_t rows) { return ptr ? ptr + rows * re : nullptr; };
    p.q = shift(f.q, l.F - l.c);
    p.k = shift(f.k, plan.chunk_row());
    p.v = shift(f.v, plan.chunk_row());
    p.maybe_kv_lens = reinterpret_cast<int const*>(at(l.kv_lens));
  }
  return c;
}

template <class Backend, class Policy, class T>
dist_layout<T> dist_make_layout(context<Backend> const& ctx, Policy const& policy, attn::dist_plan const& plan,
                                attention_args<T> const& a, int const* host_list) {
  using A = typename dist_layout<T>::A;
  dist_layout<T> l;
  l.batch = a.batch; l.heads = a.heads; l.dim = a.head_dim;
  l.c = plan.own.size();
  l.G = plan.num_globals();
  l.F = plan.frame_len;
  l.out_rows = std::max(l.F, l.c + l.G);
  l.frame_rows = l.F + l.G;
  std::size_t const re = l.row_elems(), B = std::size_t(l.batch), P = std::size_t(plan.ranks);
  std::size_t const G = std::size_t(l.G), H = std::size_t(l.heads), M = std::size_t(plan.max_owned);
  std::size_t at = 0;
  l.agree = dist_take(at, dist_agree_count * sizeof(double));
  l.fq = dist_take(at, B * l.frame_rows * re * sizeof(T));
  l.fk = dist_take(at, B * l.frame_rows * re * sizeof(T));
  l.fv = dist_take(at, B * l.frame_rows * re * sizeof(T));
  l.fo = dist_take(at, B * l.out_rows * re * sizeof(T));
  l.flse = dist_take(at, B * H * std::size_t(l.out_rows) * sizeof(A));
  l.frame_list = dist_take(at, G * sizeof(int));
  l.part_list = dist_take(at, G * sizeof(int));
  l.kv_lens = dist_take(at, B * sizeof(int));
  l.send_at.assign(P + 1, 0);
  l.recv_at.assign(P + 1, 0);
  for (std::size_t r = 0; r < P; ++r) {
    l.send_at[r + 1] = l.send_at[r] + plan.send_keys[r].size();
    l.recv_at[r + 1] = l.recv_at[r] + plan.recv_keys[r].size();
  }
  l.send_rows = dist_take(at, l.send_at[P] * sizeof(int));
  l.recv_rows = dist_take(at, l.recv_at[P] * sizeof(int));
  l.send_buf = dist_take(at, 2 * B * l.send_at[P] * re * sizeof(T));  // per peer: its keys' k, then their v
  l.recv_buf = dist_take(at, 2 * B * l.recv_at[P] * re * sizeof(T));
  l.slot_elems = 3 * B * M * re;
  l.own_rows = dist_take(at, M * sizeof(int));
  l.slot_rows = dist_take(at, P * M * sizeof(int));
  l.slot_qrows = dist_take(at, P * M * sizeof(int));
  l.gsend = dist_take(at, l.slot_elems * sizeof(T));
  l.grecv = dist_take(at, P * l.slot_elems * sizeof(T));
  l.merge_m = dist_take(at, B * H * G * sizeof(A));
  l.merge_acc = dist_take(at, B * H * G * (std::size_t(l.dim) + 1) * sizeof(A));
  // The inner attention calls' own workspace (one call at a time). The query sees the calls as they
  // will be, at a stand-in base address (aligned, never dereferenced: a backend's size query checks
  // the arguments but reads no tensor), so that a frame the backend refuses is refused here, before
  // any rank waits on another.
  auto* const stand_in = reinterpret_cast<unsigned char*>(std::uintptr_t(1) << 20);
  dist_calls<T> const calls = dist_make_calls(l, plan, stand_in, a.softmax_scale);
  auto const* const stand_in_list = reinterpret_cast<int const*>(stand_in + l.frame_list);
  attn::frame_policy<Policy> const fp{policy, plan.n, l.F, l.G, l.G > 0 ? stand_in_list : nullptr,
                                      host_list};
  l.inner_bytes = attention_workspace_bytes(ctx, fp, calls.frame);
  if (l.G > 0)
    l.inner_bytes = std::max(l.inner_bytes, attention_workspace_bytes(ctx, attn::global_tokens::explicit_list(
        reinterpret_cast<int const*>(stand_in + l.part_list), l.G), calls.part));
  l.inner = dist_take(at, l.inner_bytes);
  l.total = at + dist_align;  // room to align the caller's pointer
  return l;
}

template <class Backend, class Comm, class Policy, class T>
void dist_run(distributed_context<Backend, Comm> const& d, Policy const& policy,
              distributed_attention_args<T> const& args, attn::dist_plan const& plan, dist_layout<T> const& lay,
              unsigned char* base) {
  using exec = dist_exec<Backend>;
  using A = typename dist_layout<T>::A;
  context<Backend> const& ctx = d.local;
  Comm& comm = *d.comm;
  attention_args<T> const& a = args.chunk;
  int const B = a.batch, H = a.heads, D = a.head_dim, c = lay.c, G = lay.G, F = lay.F, P = plan.ranks,
            r = plan.rank, M = plan.max_owned;
  std::size_t const re = lay.row_elems();
  auto ptr = [&](std::size_t off) { return base + off; };
  auto tp = [&](std::size_t off) { return reinterpret_cast<T*>(base + off); };
  auto ip = [&](std::size_t off) { return reinterpret_cast<int*>(base + off); };
  auto ap = [&](std::size_t off) { return reinterpret_cast<A*>(base + off); };

  // The index lists, made on the host and moved to the backend's memory.
  {
    std::vector<int> host;
    auto put = [&](std::size_t off) {
      if (!host.empty()) exec::upload(ctx, ptr(off), host.data(), host.size() * sizeof(int));
      host.clear();
    };
    host = plan.frame_globals;
    put(lay.frame_list);
    for (int x = 0; x < G; ++x) host.push_back(c + x);
    put(lay.part_list);
    host.assign(std::size_t(B), c);
    put(lay.kv_lens);
    for (auto const& keys : plan.send_keys)
      for (int j : keys) host.push_back(j - plan.own.begin);
    put(lay.send_rows);
    for (auto const& keys : plan.recv_keys)
      for (int j : keys) host.push_back(plan.frame_row(j));
    put(lay.recv_rows);
    for (int x = plan.owned_first[std::size_t(r)]; x < plan.owned_first[std::size_t(r) + 1]; ++x)
      host.push_back(plan.globals[std::size_t(x)] - plan.own.begin);
    put(lay.own_rows);
    std::vector<int> qrows;
    for (int s = 0; s < P; ++s)
      for (int x = 0; x < M; ++x) {
        int const gi = plan.owned_first[std::size_t(s)] + x;
        bool const used = gi < plan.owned_first[std::size_t(s) + 1];
        host.push_back(used ? plan.frame_globals[std::size_t(gi)] : 0);
        qrows.push_back(used ? F + gi : 0);
      }
    put(lay.slot_rows);
    host = qrows;
    put(lay.slot_qrows);
  }

  tensor_strides const fs = attn::packed(lay.frame_rows, H, D);
  T* const fq = tp(lay.fq);
  T* const fk = tp(lay.fk);
  T* const fv = tp(lay.fv);
  // The frame starts as zeros: rows that no data reaches (halo rows no chunk row attends, and the
  // other rows' queries) are read by the kernels but never attended by the chunk's rows.
  exec::zero(ctx, fq, lay.fo - lay.fq);
  T const* const src[3] = {a.q, a.k, a.v};
  tensor_strides const ss[3] = {a.q_strides, a.k_strides, a.v_strides};
  T* const frame[3] = {fq, fk, fv};
  for (int x = 0; x < 3; ++x)
    exec::for_each(ctx, attn::move_rows<T>{frame[x], fs, nullptr, plan.chunk_row(), src[x], ss[x], nullptr, 0, B, c,
                                           H, D});

  // The halo: one send and one receive per neighbour (k rows, then v rows).
  {
    std::vector<transfer> sends, recvs;
    for (int s = 0; s < P; ++s) {
      int const ns = int(lay.send_at[std::size_t(s) + 1] - lay.send_at[std::size_t(s)]);
      if (ns > 0) {
        T* const kbuf = tp(lay.send_buf) + 2 * std::size_t(B) * lay.send_at[std::size_t(s)] * re;
        T* const vbuf = kbuf + std::size_t(B) * ns * re;
        int const* rows = ip(lay.send_rows) + lay.send_at[std::size_t(s)];
        exec::for_each(ctx, attn::move_rows<T>{kbuf, attn::packed(ns, H, D), nullptr, 0, a.k, a.k_strides, rows, 0,
                                               B, ns, H, D});
        exec::for_each(ctx, attn::move_rows<T>{vbuf, attn::packed(ns, H, D), nullptr, 0, a.v, a.v_strides, rows, 0,
                                               B, ns, H, D});
        sends.push_back({s, kbuf, 2 * std::size_t(B) * ns * re * sizeof(T)});
      }
      int const nr = int(lay.recv_at[std::size_t(s) + 1] - lay.recv_at[std::size_t(s)]);
      if (nr > 0)
        recvs.push_back({s, tp(lay.recv_buf) + 2 * std::size_t(B) * lay.recv_at[std::size_t(s)] * re,
                         2 * std::size_t(B) * nr * re * sizeof(T)});
    }
    comm.exchange(ctx, sends.data(), int(sends.size()), recvs.data(), int(recvs.size()));
    for (int s = 0; s < P; ++s) {
      int const nr = int(lay.recv_at[std::size_t(s) + 1] - lay.recv_at[std::size_t(s)]);
      if (nr == 0) continue;
      T const* const kbuf = tp(lay.recv_buf) + 2 * std::size_t(B) * lay.recv_at[std::size_t(s)] * re;
      T const* const vbuf = kbuf + std::size_t(B) * nr * re;
      int const* rows = ip(lay.recv_rows) + lay.recv_at[std::size_t(s)];
      exec::for_each(ctx, attn::move_rows<T>{fk, fs, rows, 0, kbuf, attn::packed(nr, H, D), nullptr, 0, B, nr, H, D});
      exec::for_each(ctx, attn::move_rows<T>{fv, fs, rows, 0, vbuf, attn::packed(nr, H, D), nullptr, 0, B, nr, H, D});
    }
  }

  // The global tokens' q, k and v: an all-gather of each rank's own, into the frame (k, v at their
  // frame rows; q after the frame, for the part call).
  int const own_count = plan.owned_first[std::size_t(r) + 1] - plan.owned_first[std::size_t(r)];
  if (G > 0) {
    T* const slot = tp(lay.gsend);
    std::size_t const part = std::size_t(B) * M * re;  // q, k or v of one slot
    exec::zero(ctx, slot, lay.slot_elems * sizeof(T));
    for (int x = 0; x < 3; ++x)
      if (own_count > 0)
        exec::for_each(ctx, attn::move_rows<T>{slot + x * part, attn::packed(M, H, D), nullptr, 0, src[x], ss[x],
                                               ip(lay.own_rows), 0, B, own_count, H, D});
    comm.all_gather(ctx, slot, tp(lay.grecv), lay.slot_elems * sizeof(T));
    for (int s = 0; s < P; ++s) {
      int const count = plan.owned_first[std::size_t(s) + 1] - plan.owned_first[std::size_t(s)];
      if (count == 0) continue;
      T const* const from = tp(lay.grecv) + std::size_t(s) * lay.slot_elems;
      int const* const rows = ip(lay.slot_rows) + std::size_t(s) * M;
      int const* const qrows = ip(lay.slot_qrows) + std::size_t(s) * M;
      exec::for_each(ctx, attn::move_rows<T>{fq, fs, qrows, 0, from, attn::packed(M, H, D), nullptr, 0, B, count, H, D});
      exec::for_each(ctx, attn::move_rows<T>{fk, fs, rows, 0, from + part, attn::packed(M, H, D), nullptr, 0, B,
                                             count, H, D});
      exec::for_each(ctx, attn::move_rows<T>{fv, fs, rows, 0, from + 2 * part, attn::packed(M, H, D), nullptr, 0, B,
                                             count, H, D});
    }
  }

  // The chunk's rows on the frame: exact for its non-global rows.
  dist_calls<T> const calls = dist_make_calls(lay, plan, base, a.softmax_scale);
  attn::frame_policy<Policy> const fp{policy, plan.n, F, G, G > 0 ? ip(lay.frame_list) : nullptr,
                                      args.maybe_host_global_list};
  attention(ctx, fp, calls.frame, ptr(lay.inner), lay.inner_bytes);
  exec::for_each(ctx, attn::move_rows<T>{a.o, a.o_strides, nullptr, 0, tp(lay.fo), calls.frame.o_strides, nullptr,
                                         plan.chunk_row(), B, c, H, D});
  // lse [batch, heads, rows] as a tensor of head_dim 1: strides {heads·rows, 1, rows}.
  auto lse_strides = [&](int rows) { return tensor_strides{std::int64_t(H) * rows, 1, rows}; };
  if (a.maybe_lse)
    exec::for_each(ctx, attn::move_rows<A>{a.maybe_lse, lse_strides(c), nullptr, 0, ap(lay.flse), lse_strides(F),
                                           nullptr, plan.chunk_row(), B, c, H, 1});
  if (G == 0) return;

  // The global rows over this chunk's keys, merged with the other ranks' parts.
  attention(ctx, attn::global_tokens::explicit_list(ip(lay.part_list), G), calls.part, ptr(lay.inner),
            lay.inner_bytes);
  A* const m = ap(lay.merge_m);
  A* const acc = ap(lay.merge_acc);
  exec::for_each(ctx, attn::move_rows<A>{m, lse_strides(G), nullptr, 0, ap(lay.flse), lse_strides(c + G), nullptr, c,
                                         B, G, H, 1});
  comm.all_reduce(ctx, m, std::size_t(B) * H * G, reduction::max);
  exec::for_each(ctx, attn::merge_weigh<T, A>{acc, m, tp(lay.fo), calls.part.o_strides, ap(lay.flse), c + G, c, B, H,
                                              G, D});
  comm.all_reduce(ctx, acc, std::size_t(B) * H * G * (D + 1), reduction::sum);
  if (own_count > 0)
    exec::for_each(ctx, attn::merge_finish<T, A>{a.o, a.o_strides, a.maybe_lse, c, acc, m, ip(lay.own_rows),
                                                 plan.owned_first[std::size_t(r)], own_count, B, H, G, D});
}

}  // namespace detail

/// Bytes of workspace `distributed_attention` needs on this rank (it differs between ranks: the
/// halos and the global tokens differ).
template <class Backend, class Comm, class Policy, class T>
std::size_t distributed_attention_workspace_bytes(distributed_context<Backend, Comm> const& d, Policy const& policy,
                                                  distributed_attention_args<T> const& args) {
  detail::check_policy<Policy>();
  detail::dist_check_comm("distributed_attention", d.comm);
  auto const plan = attn::make_dist_plan(policy, args.seq, args.chunk.heads, d.comm->size(), d.comm->rank(),
                                         args.maybe_host_global_list, detail::dist_exec<Backend>::host_memory);
  return detail::dist_make_layout(d.local, policy, plan, args.chunk, args.maybe_host_global_list).total;
}

/// Runs one sequence-parallel attention call; every rank of the communicator calls it with the same
/// policy, sequence length, batch, heads and head_dim, and its own chunk. Collective: a rank whose
/// arguments are refused throws drdiff::error, and so do all the others (after one all-reduce).
/// `workspace` is caller-owned backend memory of at least distributed_attention_workspace_bytes().
/// Results equal one device's drdiff::attention on the whole sequence, up to the order of sums.
template <class Backend, class Comm, class Policy, class T>
void distributed_attention(distributed_context<Backend, Comm> const& d, Policy const& policy,
                           distributed_attention_args<T> const& args, void* workspace, std::size_t workspace_bytes) {
  static_assert(is_backend_v<Backend>, "drdiff::distributed_attention: Backend must be drdiff::cpu or drdiff::cuda.");
  detail::check_policy<Policy>();
  detail::dist_check_comm("distributed_attention", d.comm);
  Comm& comm = *d.comm;
  detail::dist_exec<Backend>::enter(d.local);
  detail::dist_check_agree_space("distributed_attention", comm, workspace, workspace_bytes);
  unsigned char* const base = detail::dist_aligned(workspace);
  attention_args<T> const& a = args.chunk;

  std::string failure;
  attn::dist_plan plan;
  detail::dist_layout<T> lay;
  try {
    DRDIFF_CHECK(a.maybe_kv_lens == nullptr, "distributed_attention: chunk.maybe_kv_lens must be null (padded "
                 "batches are not split across ranks: pad every sequence to the same length)");
    plan = attn::make_dist_plan(policy, args.seq, a.heads, comm.size(), comm.rank(), args.maybe_host_global_list,
                                detail::dist_exec<Backend>::host_memory);
    DRDIFF_CHECK(a.seq == plan.own.size(), "distributed_attention: rank ", comm.rank(), " holds chunk.seq = ", a.seq,
                 " rows, but its chunk of seq = ", args.seq, " over ", comm.size(), " ranks is [", plan.own.begin,
                 ", ", plan.own.end, ")");
    validate(a, false);
    lay = detail::dist_make_layout(d.local, policy, plan, a, args.maybe_host_global_list);
    DRDIFF_CHECK(workspace_bytes >= lay.total, "distributed_attention: workspace_bytes = ", workspace_bytes,
                 " is smaller than the ", lay.total, " bytes distributed_attention_workspace_bytes() asks for");
  } catch (error const& e) {
    failure = e.what();
  }
  // The shapes, the scale and the pattern (every head's window, dilations and global tokens): a rank
  // with another policy would send and receive other halos.
  detail::dist_fingerprint pattern;
  if (failure.empty())
    for (int h = 0; h < a.heads; ++h) {
      attn::pattern const p = attn::bind(policy, args.seq, h);
      for (std::int64_t v : {std::int64_t(p.is_dense), std::int64_t(p.window), std::int64_t(p.num_dilations)})
        pattern.add(v);
      for (int c = 0; c < p.num_dilations; ++c) {
        pattern.add(p.dil[c].rate);
        pattern.add(p.dil[c].span);
      }
    }
  for (int g : plan.globals) pattern.add(g);
  double const shape[7] = {double(args.seq), double(a.batch), double(a.heads), double(a.head_dim), double(sizeof(T)),
                           a.scale(), pattern.value()};
  char const* const names[7] = {"seq", "batch", "heads", "head_dim", "the element size", "softmax_scale",
                                "the attention pattern (its fingerprint)"};
  detail::dist_agree<Backend>(d, "distributed_attention", failure, shape, names, 7, base);
  try {
    detail::dist_run(d, policy, args, plan, lay, base);
  } catch (...) {
    if constexpr (detail::has_abort<Comm>::value) comm.abort();
    throw;
  }
}

DRDIFF_NAMESPACE_END
