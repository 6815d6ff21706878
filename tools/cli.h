// Subcommands of the tqattn command, one file each.
#pragma once

#include <string>
#include <vector>

namespace tqattn::tools {

using Args = std::vector<std::string>;

int run_codebook(const Args& args);
int run_demo(const Args& args);

// "--name value" lookup with a default; throws InvalidArgument on a malformed number.
std::string flag(const Args& args, const std::string& name, const std::string& fallback);
double flag_number(const Args& args, const std::string& name, double fallback);
bool has_flag(const Args& args, const std::string& name);

}  // namespace tqattn::tools
