#include <cmath>
#include <cstdio>

#include "tools/cli.h"
#include "tqattn/tqattn.h"

namespace tqattn::tools {

int run_codebook(const Args& args) {
  if (!has_flag(args, "--dim") || !has_flag(args, "--bits"))
    throw_invalid("codebook", "--dim D --bits B", "missing flags");
  const double dim = flag_number(args, "--dim", 0);
  const double bits = flag_number(args, "--bits", 0);
  if (dim != std::floor(dim) || bits != std::floor(bits))
    throw_invalid("codebook", "integer --dim and --bits", detail::concat(dim, ", ", bits));
  const auto codebook = Codebook::lloyd_max(static_cast<int>(dim), static_cast<int>(bits));
  for (float c : codebook->centroids()) std::printf("%.9g\n", c);
  std::printf("mse %.9g\n", codebook->distortion());
  return 0;
}

}  // namespace tqattn::tools
