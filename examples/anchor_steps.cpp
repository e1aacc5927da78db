// The anchor step study of docs/anchors.md: solver steps needed to reach 99 % token accuracy after
// rounding, with and without anchor guidance, for DDIM and DPM-Solver++ 2M, on the exact mixture of
// deltas (target: the ideal text) and on a noisy version of it (target: its own converged text). Prints a Markdown table and writes anchor_steps.csv.
//
//   drdiff-anchor-steps [output-dir]

#include "cli_support.hpp"

#include "anchor_study.hpp"

#include <chrono>
#include <cstdio>
#include <fstream>
#include <string>

using namespace drdiff;

int main(int argc, char** argv) {
  std::string dir = ".";
  CLI::App app{"drdiff-anchor-steps: the anchor step study (quality against solver steps, with and without "
               "guidance)", "drdiff-anchor-steps"};
  app.option_defaults()->always_capture_default();
  app.add_option("dir", dir, "where the CSV goes");
  drdiff::examples::parse_or_exit(app, argc, argv);
  std::ofstream csv = drdiff::examples::open_output_or_exit(app, dir, "anchor_steps.csv");
  auto const t0 = std::chrono::steady_clock::now();
  int const V = 32, d = 32, P = 1000;
  study::step_study const s(V, d, P, 7);
  study::noisy_mixture const noisy(s.problem, 0.3, 11);
  auto const ideal = s.ideal();
  {  // the ideal text does not depend on the reference solver
    solver::dpmpp_config c3;
    c3.order = 3;
    auto const grid = solver::make_grid(s.problem.ops, 2000, solver::spacing::uniform_lambda, s.t_start, s.t_end);
    std::vector<double> x = s.start, ws(3 * x.size());
    solver::dpmpp_sample(context<cpu>{1}, s.problem.ops, c3, grid, s.problem, x.data(), x.size(), ws.data());
    std::vector<int> ids(static_cast<std::size_t>(P));
    anchor::round_to_nearest(context<cpu>{1}, s.clamp(), s.shape(), x.data(), ids.data());
    std::printf("ideal text: 2M@1000 and 3M@2000 agree on %.1f %% of %d positions\n\n",
                100.0 * study::step_study::accuracy(ids, ideal), P);
  }
  std::vector<int> scan;
  for (int n = 1; n <= 60; ++n) scan.push_back(n);
  for (int n : {70, 80, 100, 125, 150, 200}) scan.push_back(n);

  struct guide {
    char const* name;
    bool on;
    anchor::guidance_schedule sch;
  };
  guide const guides[] = {{"none", false, {}},
                          {"clamp, λ ≥ 1.5, γ = 1", true, study::late_clamp()},
                          {"clamp, γ 0→1 over λ ∈ [−1, 2.5]", true, study::ramp_clamp()}};
  csv << "problem,solver,guidance,steps_to_99,acc_10,acc_20,acc_1000\n";
  std::printf("| problem | solver | guidance | steps to 99 %% | accuracy at 10 | at 20 | at 1000 |\n");
  std::printf("|---|---|---|---|---|---|---|\n");
  auto rows = [&](char const* problem, auto const& model, std::vector<int> const& ideal) {
    for (int order : {1, 2})
      for (auto const& g : guides) {
        study::setup st;
        st.order = order;
        st.guided = g.on;
        st.schedule = g.sch;
        int need = 0;
        for (int n : scan)
          if (study::step_study::accuracy(s.tokens(model, st, n), ideal) >= 0.99) {
            need = n;
            break;
          }
        double const a10 = study::step_study::accuracy(s.tokens(model, st, 10), ideal);
        double const a20 = study::step_study::accuracy(s.tokens(model, st, 20), ideal);
        double const a1000 = study::step_study::accuracy(s.tokens(model, st, 1000), ideal);
        std::string const steps = need ? std::to_string(need) : std::string("> 200");
        std::printf("| %s | %s | %s | %s | %.1f %% | %.1f %% | %.1f %% |\n", problem, order == 1 ? "DDIM" : "2M",
                    g.name, steps.c_str(), 100 * a10, 100 * a20, 100 * a1000);
        std::fflush(stdout);
        csv << problem << "," << (order == 1 ? "DDIM" : "2M") << ",\"" << g.name << "\"," << need << "," << a10 << ","
            << a20 << "," << a1000 << "\n";
      }
  };
  rows("exact", s.problem, ideal);
  // The noisy denoiser's own flow ends elsewhere on some positions; its target is its own converged
  // text (2M, 1000 steps), so the rows measure how fast each sampler gets there.
  auto const noisy_ideal = s.tokens(noisy, study::setup{}, 1000);
  rows("noisy (η = 0.3)", noisy, noisy_ideal);
  std::printf("\nthe noisy denoiser's converged text agrees with the ideal text on %.1f %% of positions\n",
              100.0 * study::step_study::accuracy(noisy_ideal, ideal));
  double const secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("\nV = %d tokens, d = %d, %d positions, vp_linear, uniform-λ grid t: 1 → 1e-3; %.1f s\n", V, d, P, secs);
  std::printf("wrote %s/anchor_steps.csv\n", dir.c_str());
  return 0;
}
