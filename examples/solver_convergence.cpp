// Error against the exact answer versus the number of model evaluations, for each DPM-Solver++
// variant, on two problems with known solutions: Gaussian data (closed-form trajectory) and the
// mixture of deltas (the ideal text denoiser; reference: Taylor 3M with 20,000 steps). Writes
// solver_convergence.csv and, when gnuplot is installed, the log-log plot solver_convergence.png.
//
//   drdiff-solver-convergence [output-dir]

#include "cli_support.hpp"

#include <drdiff/cpu/solver.hpp>
#include <drdiff/solver/problems.hpp>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

using namespace drdiff;
using namespace drdiff::solver;

namespace {

struct variant {
  char const* name;
  dpmpp_config cfg;
};

std::vector<variant> variants() {
  auto const make = [](int order, second_order s2, third_order s3) {
    dpmpp_config c;
    c.order = order;
    c.second = s2;
    c.third = s3;
    c.lower_order_final = false;
    return c;
  };
  return {{"DDIM", make(1, second_order::midpoint, third_order::taylor)},
          {"2M midpoint", make(2, second_order::midpoint, third_order::taylor)},
          {"2M heun", make(2, second_order::heun, third_order::taylor)},
          {"3M published", make(3, second_order::midpoint, third_order::published)},
          {"3M Taylor", make(3, second_order::midpoint, third_order::taylor)},
          {"2S (2 NFE/step)", [&] {
             auto c = make(2, second_order::midpoint, third_order::taylor);
             c.singlestep = true;
             return c;
           }()}};
}

template <class Model>
std::vector<double> run(schedule_ops<vp_linear> const& ops, dpmpp_config const& cfg, int steps, double t0, double t1,
                        Model const& model, std::vector<double> x) {
  auto const grid = make_grid(ops, steps, spacing::uniform_lambda, t0, t1);
  std::vector<double> ws(3 * x.size());
  dpmpp_sample(context<cpu>{1}, ops, cfg, grid, model, x.data(), x.size(), ws.data());
  return x;
}

}  // namespace

int main(int argc, char** argv) {
  std::string dir = ".";
  CLI::App app{"drdiff-solver-convergence: error against model evaluations of each solver on the Gaussian and "
               "mixture problems (CSV + PNG)", "drdiff-solver-convergence"};
  app.option_defaults()->always_capture_default();
  app.add_option("dir", dir, "where the CSV and the PNG go");
  drdiff::examples::parse_or_exit(app, argc, argv);
  std::ofstream csv = drdiff::examples::open_output_or_exit(app, dir, "solver_convergence.csv");
  csv << "problem,solver,nfe,error\n";
  int const nfes[] = {5, 10, 20, 40, 80, 160, 320};

  // One study: a table on stdout and rows in the CSV; error(cfg, steps) runs one solve.
  auto study = [&](char const* problem, char const* title, auto&& error) {
    std::printf("%s\n%-16s", title, "NFE");
    for (int n : nfes) std::printf("%10d", n);
    std::printf("\n");
    for (auto const& v : variants()) {
      std::printf("%-16s", v.name);
      for (int n : nfes) {
        double const e = error(v.cfg, v.cfg.singlestep ? std::max(1, n / 2) : n);  // 2S: 2 NFE per step
        std::printf("%10.2e", e);
        csv << problem << "," << v.name << "," << n << "," << e << "\n";
      }
      std::printf("\n");
    }
    std::printf("\n");
  };

  // Gaussian data N(0.7, 0.5²), t: 1 → 1e-3, five trajectories; max error against the exact solution.
  gaussian_problem const g;
  std::vector<double> const starts = {-2.0, -0.5, 0.3, 1.1, 2.4};
  study("gaussian", "Gaussian data (max error vs the exact ODE solution)", [&](dpmpp_config const& cfg, int steps) {
    auto const x = run(g.ops, cfg, steps, 1.0, 1e-3,
                       [&](double const* xs, double t, double* out) { g(xs, t, out, starts.size()); }, starts);
    double e = 0;
    for (std::size_t i = 0; i < x.size(); ++i) e = std::max(e, std::abs(x[i] - g.exact(starts[i], 1.0, 1e-3)));
    return e;
  });

  // Mixture of 5 deltas in R³, 64 trajectories, λ: −3 → 2.5; RMS error against the reference.
  mixture_of_deltas const m(5, 3, 64, 4);
  std::vector<double> start(std::size_t(m.P) * m.d);
  std::mt19937 rng(104);
  std::normal_distribution<double> nd(0, 1);
  for (auto& e : start) e = nd(rng);
  double const t0 = m.ops.t_of_lambda(-3.0), t1 = m.ops.t_of_lambda(2.5);
  auto const ref = run(m.ops, variants()[4].cfg, 20000, t0, t1, m, start);  // Taylor 3M
  study("mixture", "Mixture of deltas (RMS error vs a 20,000-step reference)", [&](dpmpp_config const& cfg, int steps) {
    return rms_diff(run(m.ops, cfg, steps, t0, t1, m, start), ref);
  });
  csv.close();

  // The plot: two log-log panels, one line per solver.
  std::string const gp = dir + "/solver_convergence.gp";
  {
    std::ofstream s(gp);
    s << "set terminal pngcairo size 1400,560 font ',11'\nset output '" << dir << "/solver_convergence.png'\n"
      << "set datafile separator ','\nset logscale xy\nset format y '%.0e'\nset grid\nset key bottom left\nset xlabel 'model evaluations'\n"
      << "set multiplot layout 1,2\n";
    for (char const* problem : {"gaussian", "mixture"}) {
      s << "set title '" << (std::string(problem) == "gaussian" ? "Gaussian data: max error vs exact solution"
                                                                  : "Mixture of deltas: RMS error vs reference")
        << "'\nset ylabel 'error'\nplot ";
      bool first = true;
      for (auto const& v : variants()) {
        s << (first ? "" : ", ") << "'" << dir << "/solver_convergence.csv' using (strcol(1) eq '" << problem << "' && strcol(2) eq '"
          << v.name << "' ? $3 : 1/0):4 with linespoints lw 2 title '" << v.name << "'";
        first = false;
      }
      s << "\n";
    }
    s << "unset multiplot\n";
  }
  std::printf("wrote %s/solver_convergence.csv\n", dir.c_str());
  if (std::system(("gnuplot '" + gp + "' 2>/dev/null").c_str()) == 0)
    std::printf("wrote %s/solver_convergence.png\n", dir.c_str());
  else
    std::printf("gnuplot not found: no plot (scripts/main.sh installs it)\n");
  return 0;
}
