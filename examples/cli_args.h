// Command-line parsing shared by chatd and chat-cli.
//
// Integer flags take plain decimal numbers. CLI11 (2.1) reads integers with strtoull/strtoll in
// base 0: "-1" given to an unsigned option wraps to its largest value (chatd
// --max-message-bytes -1 lifted the message cap), "010" is octal and "0x50" hexadecimal.
// PlainDecimalNumbers makes every integer option of an app and of its subcommands take decimal
// digits only, with a sign only where the type has one; leading zeros are dropped.
#ifndef CHAT_EXAMPLES_CLI_ARGS_H_
#define CHAT_EXAMPLES_CLI_ARGS_H_

#include <cctype>
#include <optional>
#include <string>

#include "CLI/CLI.hpp"
#include "chat/log.h"

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

// Parses `argv` into `app` (its integer options taking plain decimal numbers). Returns the exit
// code when parsing ends the program: 0 after --help, 2 for any argument CLI11 refuses (instead
// of CLI11's own codes, 103 to 114); nullopt to go on.
inline std::optional<int> ParseArguments(CLI::App& app, int argc, char** argv) {
  PlainDecimalNumbers(&app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 2;
  }
  return std::nullopt;
}

// Adds --log-level to `app`: the SDK's log lines (chat/log.h) below the level named in `level`
// are dropped. Its value is one of LogLevelNamed's names.
inline CLI::Option* AddLogLevelOption(CLI::App* app, std::string* level, const std::string& help) {
  return app->add_option("--log-level", *level, help)
      ->check(CLI::IsMember({"debug", "info", "warn", "error", "off"}))
      ->capture_default_str();
}

// The level a value of --log-level names.
inline chat::LogLevel LogLevelNamed(const std::string& name) {
  if (name == "debug") return chat::LogLevel::kDebug;
  if (name == "info") return chat::LogLevel::kInfo;
  if (name == "warn") return chat::LogLevel::kWarn;
  if (name == "error") return chat::LogLevel::kError;
  return chat::LogLevel::kOff;
}

}  // namespace chat::examples

#endif  // CHAT_EXAMPLES_CLI_ARGS_H_
