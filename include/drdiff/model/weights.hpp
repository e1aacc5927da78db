#pragma once
/// \file
/// model_weights: the host copy of a model's tensors in fp32 (names and shapes from
/// parameter_specs), with seeded random initialisation and safetensors load/save. Both backends
/// build from it: the CPU model computes on it, the GPU model uploads it (bf16 matrices).

#include <drdiff/model/parameters.hpp>
#include <drdiff/model/safetensors.hpp>
#include <drdiff/solver/noise.hpp>

#include <cmath>
#include <map>
#include <string>
#include <vector>

DRDIFF_NAMESPACE_BEGIN

class model_weights {
 public:
  model_weights(model_sizes const& s, ffn_activation act) : specs_(parameter_specs(s, act)) {
    s.validate();
    for (std::size_t i = 0; i < specs_.size(); ++i) {
      index_.emplace(specs_[i].name, i);
      data_.emplace_back(std::size_t(specs_[i].elements()), 0.f);
    }
  }

  std::vector<parameter_spec> const& specs() const noexcept { return specs_; }
  std::vector<float>& tensor(std::string const& name) { return data_[find(name)]; }
  std::vector<float> const& tensor(std::string const& name) const { return data_[find(name)]; }
  bool has(std::string const& name) const noexcept { return index_.count(name) != 0; }

  /// Seeded random weights (counter-based normals, the same on every machine): N(0, stddev²) per
  /// spec, norm gains 1, biases 0.
  void init_random(std::uint64_t seed) {
    for (std::size_t i = 0; i < specs_.size(); ++i) {
      auto const& s = specs_[i];
      auto& p = data_[i];
      solver::gaussian_noise const g{solver::gaussian_noise::mix(seed ^ solver::gaussian_noise::mix(i + 1))};
      for (std::size_t j = 0; j < p.size(); ++j)
        p[j] = s.how == parameter_spec::init::ones    ? 1.f
               : s.how == parameter_spec::init::zeros ? 0.f
                                                      : float(s.stddev * g(0, j));
    }
  }
  /// Every tensor from a safetensors file; a missing tensor, an extra one or a wrong shape is a
  /// drdiff::error naming it.
  void load(safetensors::file const& f) {
    for (auto const& t : f.tensors())
      DRDIFF_CHECK(index_.count(t.name) != 0, "model: the weights hold tensor '", t.name,
                   "', which this configuration does not have");
    // Read and check everything into new buffers first: a refused file leaves the weights as they were.
    std::vector<std::vector<float>> fresh(specs_.size());
    for (std::size_t i = 0; i < specs_.size(); ++i) {
      fresh[i].resize(data_[i].size());
      f.read(specs_[i].name, specs_[i].shape, fresh[i].data());
      // Weights are untrusted input: a NaN or an infinity would only show up, if at all, as NaN
      // text much later. Refuse it here, naming the tensor and the element.
      auto const& d = fresh[i];
      for (std::size_t j = 0; j < d.size(); ++j)
        DRDIFF_CHECK(std::isfinite(d[j]), "model: tensor '", specs_[i].name, "' element ", j, " = ", d[j],
                     " is not finite");
    }
    data_.swap(fresh);
  }
  void load(std::string const& path) { load(safetensors::file::open(path)); }
  /// Writes every tensor (F32 is bit-exact; F16/BF16 round to nearest even).
  void save(std::string const& path, safetensors::dtype type = safetensors::dtype::f32) const {
    safetensors::writer w;
    w.metadata["format"] = "drdiff";
    for (std::size_t i = 0; i < specs_.size(); ++i) w.add(specs_[i].name, type, specs_[i].shape, data_[i].data());
    w.save(path);
  }

 private:
  std::vector<parameter_spec> specs_;
  std::map<std::string, std::size_t> index_;
  std::vector<std::vector<float>> data_;

  std::size_t find(std::string const& name) const {
    auto const it = index_.find(name);
    DRDIFF_CHECK(it != index_.end(), "model: no tensor named '", name, "'");
    return it->second;
  }
};

DRDIFF_NAMESPACE_END
