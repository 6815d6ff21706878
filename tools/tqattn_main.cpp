// The tqattn command: demo (the main job), codebook, help.
#include <cstdio>
#include <exception>
#include <string>

#include "tools/cli.h"
#include "tqattn/tqattn.h"

namespace tqattn::tools {

std::string flag(const Args& args, const std::string& name, const std::string& fallback) {
  for (size_t i = 0; i + 1 < args.size(); ++i)
    if (args[i] == name) return args[i + 1];
  return fallback;
}

double flag_number(const Args& args, const std::string& name, double fallback) {
  const std::string text = flag(args, name, "");
  if (text.empty()) return fallback;
  size_t used = 0;
  double value = 0;
  try {
    value = std::stod(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used != text.size()) throw_invalid("cli", name + " followed by a number", text);
  return value;
}

bool has_flag(const Args& args, const std::string& name) {
  for (const auto& a : args)
    if (a == name) return true;
  return false;
}

}  // namespace tqattn::tools

namespace {

void usage() {
  std::printf(
      "tqattn %s: attention over a TurboQuant-quantized KV cache\n\n"
      "usage:\n"
      "  tqattn demo [--quick] [--context S] [--threads N] ...   the main job (see --help)\n"
      "  tqattn codebook --dim D --bits B      Lloyd-Max centroids, then 'mse <d*C>'\n",
      tqattn::version());
}

}  // namespace

int main(int argc, char** argv) {
  const tqattn::tools::Args args(argv + 1, argv + argc);
  if (args.empty() || args[0] == "help" || args[0] == "--help" || args[0] == "-h") {
    usage();
    return args.empty() ? 2 : 0;
  }
  const tqattn::tools::Args rest(args.begin() + 1, args.end());
  try {
    if (args[0] == "codebook") return tqattn::tools::run_codebook(rest);
    if (args[0] == "demo") return tqattn::tools::run_demo(rest);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  std::fprintf(stderr, "error: unknown command '%s'\n", args[0].c_str());
  usage();
  return 2;
}
