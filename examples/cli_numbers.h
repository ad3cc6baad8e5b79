// Integer flags of chatd and chat-cli take plain decimal numbers.
//
// CLI11 (2.1) reads integers with strtoull/strtoll in base 0: "-1" given to an unsigned option
// wraps to its largest value (chatd --max-message-bytes -1 lifted the message cap), "010" is
// octal and "0x50" hexadecimal. PlainDecimalNumbers makes every integer option of an app and of
// its subcommands take decimal digits only, with a sign only where the type has one; leading
// zeros are dropped. Call it after the options are added, before parsing.
#ifndef CHAT_EXAMPLES_CLI_NUMBERS_H_
#define CHAT_EXAMPLES_CLI_NUMBERS_H_

#include <cctype>
#include <string>

#include "CLI/CLI.hpp"

namespace chat::examples {

inline void PlainDecimalNumbers(CLI::App* app) {
  for (CLI::Option* option : app->get_options()) {
    const std::string type = option->get_type_name();
    if (type != "UINT" && type != "INT") continue;
    const bool sign = type == "INT";
    option->transform(CLI::Validator(
        [sign](std::string& text) -> std::string {
          size_t start = sign && !text.empty() && text[0] == '-' ? 1 : 0;
          if (start == text.size()) return "a decimal number is required, not \"" + text + "\"";
          for (size_t i = start; i < text.size(); ++i) {
            if (!std::isdigit(static_cast<unsigned char>(text[i]))) {
              return std::string(sign ? "an integer" : "a non-negative integer") +
                     " of decimal digits is required, not \"" + text + "\"";
            }
          }
          while (start + 1 < text.size() && text[start] == '0') text.erase(start, 1);
          return "";
        },
        "", "decimal"));
  }
  for (CLI::App* sub : app->get_subcommands({})) PlainDecimalNumbers(sub);
}

}  // namespace chat::examples

#endif  // CHAT_EXAMPLES_CLI_NUMBERS_H_
