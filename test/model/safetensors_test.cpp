// safetensors: bit-exact round trips, the 16-bit conversions against exhaustive and compiler
// references, and every corrupt or mismatched file rejected with a message naming the problem.

#include <drdiff/model/safetensors.hpp>

#include <catch2/catch.hpp>

#include <dirent.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

using namespace drdiff;
using namespace drdiff::safetensors;
using Catch::Matchers::Contains;

namespace {

std::vector<std::uint8_t> make_file(std::string header, std::vector<std::uint8_t> const& data) {
  std::uint64_t const n = header.size();
  std::vector<std::uint8_t> b(8 + header.size() + data.size());
  for (int k = 0; k < 8; ++k) b[std::size_t(k)] = std::uint8_t(n >> (8 * k));
  std::copy(header.begin(), header.end(), b.begin() + 8);
  std::copy(data.begin(), data.end(), b.begin() + 8 + std::ptrdiff_t(header.size()));
  return b;
}
std::vector<std::uint8_t> zeros(std::size_t n) { return std::vector<std::uint8_t>(n, 0); }

std::uint32_t bits(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

}  // namespace

TEST_CASE("safetensors: F32, F16 and BF16 round-trip through the writer and the reader", "[safetensors]") {
  std::mt19937 rng(std::random_device{}());
  std::normal_distribution<float> nd(0.f, 3.f);
  std::vector<float> a(6 * 5), b(7), c(4 * 3 * 2);
  for (auto& v : a) v = nd(rng);
  for (auto& v : b) v = f16_to_float(float_to_f16(nd(rng)));  // representable in F16
  for (auto& v : c) v = bf16_to_float(float_to_bf16(nd(rng)));
  a[3] = -0.f;
  a[4] = INFINITY;
  writer w;
  w.metadata["format"] = "pt";
  w.metadata["note \"quoted\"\n"] = "é ✓";
  w.add("blocks.0.attn.wq", dtype::f32, {6, 5}, a.data());
  w.add("embed", dtype::f16, {7}, b.data());
  w.add("z.bf16", dtype::bf16, {4, 3, 2}, c.data());
  w.add("empty", dtype::f32, {0, 4}, nullptr);
  auto const bytes = w.bytes();
  auto const f = file::parse(bytes);
  REQUIRE(f.tensors().size() == 4);
  CHECK(f.metadata().at("format") == "pt");
  CHECK(f.metadata().at("note \"quoted\"\n") == "é ✓");
  std::vector<float> ra(a.size()), rb(b.size()), rc(c.size());
  f.read("blocks.0.attn.wq", {6, 5}, ra.data());
  f.read("embed", {7}, rb.data());
  f.read("z.bf16", {4, 3, 2}, rc.data());
  for (std::size_t i = 0; i < a.size(); ++i) REQUIRE(bits(ra[i]) == bits(a[i]));
  for (std::size_t i = 0; i < b.size(); ++i) REQUIRE(bits(rb[i]) == bits(b[i]));
  for (std::size_t i = 0; i < c.size(); ++i) REQUIRE(bits(rc[i]) == bits(c[i]));
  CHECK(f.at("empty").elements() == 0);
  // header padded to 8 bytes; writing what was read gives the same bytes
  CHECK((bytes.size() - 8 - (f.at("z.bf16").end)) % 8 == 0);
  writer w2;
  w2.metadata = f.metadata();
  w2.add("blocks.0.attn.wq", dtype::f32, {6, 5}, ra.data());
  w2.add("embed", dtype::f16, {7}, rb.data());
  w2.add("z.bf16", dtype::bf16, {4, 3, 2}, rc.data());
  w2.add("empty", dtype::f32, {0, 4}, nullptr);
  CHECK(w2.bytes() == bytes);

  CHECK_THROWS_WITH(f.read("embed", {1, 7}, rb.data()), Contains("'embed' has shape [7], expected [1, 7]"));
  CHECK_THROWS_WITH(f.read("nope", {7}, rb.data()), Contains("missing tensor 'nope'"));
}

TEST_CASE("safetensors: 16-bit conversions are exact inverses and round to nearest even", "[safetensors]") {
  for (std::uint32_t h = 0; h < 65536; ++h) {
    float const f16 = f16_to_float(std::uint16_t(h)), b16 = bf16_to_float(std::uint16_t(h));
    if (!std::isnan(f16)) REQUIRE(float_to_f16(f16) == h);
    if (!std::isnan(b16)) REQUIRE(float_to_bf16(b16) == h);
    if (std::isnan(f16)) REQUIRE(std::isnan(f16_to_float(float_to_f16(f16))));
    if (std::isnan(b16)) REQUIRE(std::isnan(bf16_to_float(float_to_bf16(b16))));
  }
  // Against the compiler's _Float16 (IEEE round to nearest even), over every exponent of float.
#ifdef __FLT16_MAX__
  std::mt19937 rng(std::random_device{}());
  for (int i = 0; i < 2000000; ++i) {
    std::uint32_t u = rng();
    float f;
    std::memcpy(&f, &u, 4);
    if (std::isnan(f)) continue;
    _Float16 const ref = static_cast<_Float16>(f);
    std::uint16_t rb;
    std::memcpy(&rb, &ref, 2);
    INFO("float bits " << u);
    REQUIRE(float_to_f16(f) == rb);
  }
#endif
  // bf16: halfway cases go to even
  CHECK(float_to_bf16(bf16_to_float(0x3f80) + std::ldexp(1.f, -8)) == 0x3f80);  // 1 + 2^-8: tie, 0x3f80 even
  CHECK(float_to_bf16(bf16_to_float(0x3f81) + std::ldexp(1.f, -8)) == 0x3f82);
}

TEST_CASE("safetensors: corrupt and mismatched files get a drdiff::error naming the problem", "[safetensors][errors]") {
  auto ok = [](std::string const& h, std::size_t data) { return file::parse(make_file(h, zeros(data))); };
  auto bad = [](std::string const& h, std::size_t data, std::string const& msg) {
    INFO("header " << h);
    CHECK_THROWS_WITH(file::parse(make_file(h, zeros(data))), Contains(msg));
  };
  std::string const t = R"({"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]}})";
  CHECK(ok(t, 24).tensors().size() == 1);
  CHECK(ok("{}", 0).tensors().empty());
  CHECK(ok("  {  }  ", 0).tensors().empty());

  CHECK_THROWS_WITH(file::parse({1, 2, 3}), Contains("fewer than the 8-byte header length"));
  {
    auto b = make_file(t, zeros(24));
    b[0] = 200;  // header length beyond the file
    CHECK_THROWS_WITH(file::parse(b), Contains("header length 200 goes beyond the file"));
    b[0] = 0;
    b[6] = 1;
    CHECK_THROWS_WITH(file::parse(b), Contains("exceeds the 100 MB limit"));
    auto trunc = make_file(t, zeros(24));
    trunc.resize(trunc.size() - 1);  // truncated data
    CHECK_THROWS_WITH(file::parse(trunc), Contains("go beyond the data buffer (23 bytes)"));
  }
  bad(R"({"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]})", 24, "bad header JSON");  // unclosed
  bad(R"({"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]}} x)", 24, "unexpected bytes after the header");
  bad(R"({"a":{"dtype":"F33","shape":[2,3],"data_offsets":[0,24]}})", 24, "'a': unknown dtype 'F33'");
  bad(R"({"a":{"dtype":"F32","shape":[2,-3],"data_offsets":[0,24]}})", 24, "'a': shape has a negative entry");
  bad(R"({"a":{"dtype":"F32","shape":[2,3.0],"data_offsets":[0,24]}})", 24, "'a': shape entries must be integers");
  bad(R"({"a":{"dtype":"F32","shape":[2,3]}})", 24, "'a': missing data_offsets");
  bad(R"({"a":{"shape":[2,3],"data_offsets":[0,24]}})", 24, "'a': missing dtype");
  bad(R"({"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24],"x":1}})", 24, "'a': unknown field 'x'");
  bad(R"({"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24,48]}})", 48, "'a': data_offsets must be [begin, end]");
  bad(R"({"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,20]}})", 20, "'a': F32 shape [2, 3] needs 24 bytes");
  bad(R"({"a":{"dtype":"F32","shape":[2,3],"data_offsets":[8,0]}})", 24, "'a': data_offsets [8, 0] end before");
  bad(R"({"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]}})", 30, "6 bytes after the last tensor");
  bad(R"({"a":{"dtype":"F32","shape":[2,3],"data_offsets":[8,32]}})", 32, "a hole of 8 bytes lies before tensor 'a'");
  bad(R"({"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},"b":{"dtype":"F32","shape":[2],"data_offsets":[16,24]}})",
      24, "tensor 'b' overlaps tensor 'a'");
  bad(R"({"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},"a":{"dtype":"F32","shape":[0],"data_offsets":[24,24]}})",
      24, "duplicate tensor 'a'");
  bad(R"({"a":{"dtype":"F32","shape":[4294967296,4294967296,4294967296],"data_offsets":[0,24]}})", 24,
      "'a': the byte size of shape [4294967296, 4294967296, 4294967296] overflows");
  bad(R"({"a":{"dtype":"F32","shape":[99999999999999999999],"data_offsets":[0,24]}})", 24, "overflows 64 bits");
  bad("{\"a\xff\":{}}", 0, "invalid UTF-8");
  bad("{\"a\xc0\xaf\":{}}", 0, "invalid UTF-8");  // overlong '/'
  bad(R"({"a\ud800":{}})", 0, "lone high surrogate");
  bad(R"({"__metadata__":{"k":1}})", 0, "__metadata__ values must be strings");
  bad(R"({"a":[]})", 0, "'a': its entry must be an object");
  bad("{\"a\n\":{}}", 0, "control character");
  bad(R"([])", 0, "the header must be a JSON object");
  // A dtype the model cannot use is recognised, then refused on conversion.
  auto const f = ok(R"({"i":{"dtype":"I32","shape":[2],"data_offsets":[0,8]}})", 8);
  std::vector<float> out(2);
  CHECK_THROWS_WITH(f.read("i", {2}, out.data()), Contains("'i' has dtype I32"));
}

TEST_CASE("safetensors: every truncation and random byte damage of a valid file parses or throws drdiff::error",
          "[safetensors][errors]") {
  std::vector<float> v(40, 1.5f);
  writer w;
  w.metadata["m"] = "x";
  w.add("a", dtype::f32, {4, 5}, v.data());
  w.add("b", dtype::bf16, {20}, v.data());
  auto const good = w.bytes();
  for (std::size_t n = 0; n < good.size(); ++n) {
    std::vector<std::uint8_t> cut(good.begin(), good.begin() + std::ptrdiff_t(n));
    CHECK_THROWS_AS(file::parse(cut), drdiff::error);
  }
  std::mt19937 rng(std::random_device{}());
  int parsed = 0;
  for (int i = 0; i < 20000; ++i) {
    auto b = good;
    for (int k = 0; k < 1 + int(rng() % 3); ++k) b[rng() % b.size()] = std::uint8_t(rng());
    try {
      auto const f = file::parse(b);
      std::vector<float> out(64);
      for (auto const& t : f.tensors())
        if (t.elements() <= 64 && (t.type == dtype::f32 || t.type == dtype::bf16 || t.type == dtype::f16))
          f.convert(t, out.data());
      ++parsed;
    } catch (drdiff::error const&) {
    }
  }
  CHECK(parsed > 0);  // damage in the data buffer leaves a valid file
}

TEST_CASE("safetensors: a save that fails midway leaves the previous file whole and no temporary file",
          "[safetensors][errors]") {
  std::string const dir = "atomic_save_dir";
  ::mkdir(dir.c_str(), 0755);
  std::string const path = dir + "/w.safetensors";
  std::vector<float> small(16, 1.5f), big(1 << 18, 2.5f);  // 64 B and 1 MB of F32
  writer w0;
  w0.add("x", dtype::f32, {16}, small.data());
  w0.save(path);
  auto const before = file::open(path).tensors().size();
  // In a child process whose file-size limit (RLIMIT_FSIZE, 64 KB) stops the write partway: the save
  // must throw, and the target must still be the earlier file.
  pid_t const pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    ::signal(SIGXFSZ, SIG_IGN);  // a write past the limit then fails with EFBIG instead of killing us
    struct rlimit lim {65536, 65536};
    ::setrlimit(RLIMIT_FSIZE, &lim);
    writer w1;
    w1.add("y", dtype::f32, {1 << 18}, big.data());
    try {
      w1.save(path);
    } catch (drdiff::error const& e) {
      ::_exit(std::string(e.what()).find("the file was left as it was") != std::string::npos ? 3 : 4);
    }
    ::_exit(5);
  }
  int status = 0;
  REQUIRE(::waitpid(pid, &status, 0) == pid);
  REQUIRE(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 3);  // 5: the save claimed success; 4: another message
  auto const f = file::open(path);
  CHECK(f.tensors().size() == before);
  CHECK(f.find("x") != nullptr);
  int leftovers = 0;
  if (DIR* d = ::opendir(dir.c_str())) {
    while (dirent* e = ::readdir(d)) leftovers += std::string(e->d_name).find(".tmp-") != std::string::npos;
    ::closedir(d);
  }
  CHECK(leftovers == 0);
  // And a successful save replaces the file whole.
  writer w2;
  w2.add("z", dtype::f32, {1 << 18}, big.data());
  w2.save(path);
  CHECK(file::open(path).find("z") != nullptr);
}
