// chat-cli against the real chatd: the subcommands users script with, in text and JSON.
#include <doctest/doctest.h>

#include <atomic>
#include <string>
#include <vector>

#include "tests/testing/chatd_process.h"
#include "tests/testing/client_fixtures.h"
#include "tests/testing/temp_dir.h"

namespace chat::testing {
namespace {

TEST_CASE("chat-cli: send, conversations and history, in JSON") {
  ChatdProcess chatd;
  REQUIRE(chatd.Start().ok());
  TempDir dir;
  CliRun sent =
      RunChatCli(chatd, dir, "alice", {"--json", "send", "--to", "bob", "first", "second"});
  CHECK_MESSAGE(sent.code == 0, sent.out);
  CHECK(sent.out.find("{\"type\":\"queued\",\"count\":2}") != std::string::npos);
  CHECK(sent.out.find("\"status\":\"sent\",\"conversation_id\":1,\"seq\":1") != std::string::npos);
  CHECK(sent.out.find("\"seq\":2") != std::string::npos);

  CliRun listed = RunChatCli(chatd, dir, "bob", {"--json", "conversations"});
  CHECK_MESSAGE(listed.code == 0, listed.out);
  CHECK(listed.out.find("\"conversation_id\":1,\"kind\":1,\"title\":\"\",\"peer\":\"alice\","
                        "\"last_seq\":2,\"unread\":2") != std::string::npos);

  CliRun history = RunChatCli(chatd, dir, "bob", {"--json", "history", "--conversation", "1"});
  CHECK_MESSAGE(history.code == 0, history.out);
  const size_t first = history.out.find("\"body\":\"first\"");
  const size_t second = history.out.find("\"body\":\"second\"");
  REQUIRE(first != std::string::npos);
  REQUIRE(second != std::string::npos);
  CHECK(first < second);  // oldest first on the terminal

  // Text mode, and a conversation the user is not in.
  CliRun text = RunChatCli(chatd, dir, "bob", {"history", "--conversation", "1"});
  CHECK(text.out.find("[1#1] alice: first") != std::string::npos);
  CliRun denied = RunChatCli(chatd, dir, "carol", {"history", "--conversation", "1"});
  CHECK(denied.code == 1);
  CHECK(denied.out.find("PERMISSION_DENIED") != std::string::npos);
}

TEST_CASE("chat-cli: a refused send exits non-zero and prints the reason") {
  ChatdProcess chatd;
  REQUIRE(chatd.Start().ok());
  TempDir dir;
  CliRun run = RunChatCli(chatd, dir, "alice", {"send", "--conversation", "424242", "hello"});
  CHECK(run.code == 4);
  CHECK(run.out.find("(failed) PERMISSION_DENIED") != std::string::npos);
  CliRun usage = RunChatCli(chatd, dir, "alice", {"send", "hello"});
  CHECK(usage.code == 2);
}

TEST_CASE("chat-cli: a refused message stays in the outbox until discard removes it") {
  ChatdProcess chatd;
  REQUIRE(chatd.Start().ok());
  TempDir dir;
  const std::string cache = dir.File("alice.db");
  CliRun run = RunChatCli(chatd, dir, "alice",
                          {"--cache", cache, "send", "--conversation", "424242", "hello"});
  CHECK(run.code == 4);
  CliRun listed = RunChatCli(chatd, dir, "alice", {"--cache", cache, "--json", "outbox"});
  CHECK_MESSAGE(listed.code == 0, listed.out);
  CHECK(listed.out.find("\"status\":\"failed\"") != std::string::npos);
  CHECK(listed.out.find("PERMISSION_DENIED") != std::string::npos);
  const std::string key = "\"client_msg_id\":\"";
  const size_t at = listed.out.find(key);
  REQUIRE(at != std::string::npos);
  const std::string id = listed.out.substr(at + key.size(), 44);

  CliRun discarded = RunChatCli(chatd, dir, "alice", {"--cache", cache, "discard", id});
  CHECK_MESSAGE(discarded.code == 0, discarded.out);
  CliRun empty = RunChatCli(chatd, dir, "alice", {"--cache", cache, "--json", "outbox"});
  CHECK(empty.code == 0);
  CHECK(empty.out.find("\"type\":\"message\"") == std::string::npos);
  CliRun again = RunChatCli(chatd, dir, "alice", {"--cache", cache, "discard", id});
  CHECK(again.code == 1);
  CHECK(again.out.find("NOT_FOUND") != std::string::npos);
}

TEST_CASE("chat-cli: group-create and mark-read, in JSON") {
  ChatdProcess chatd;
  REQUIRE(chatd.Start().ok());
  TempDir dir;
  CliRun created = RunChatCli(chatd, dir, "alice",
                              {"--json", "group-create", "--title", "team", "bob", "carol"});
  CHECK_MESSAGE(created.code == 0, created.out);
  CHECK(created.out.find("{\"type\":\"conversation\",\"conversation_id\":1,\"kind\":2,"
                         "\"title\":\"team\"") != std::string::npos);
  CHECK(created.out.find("\"member_count\":3,\"role\":2") != std::string::npos);

  CliRun sent = RunChatCli(chatd, dir, "alice", {"send", "--conversation", "1", "hello", "team"});
  CHECK_MESSAGE(sent.code == 0, sent.out);
  CliRun before = RunChatCli(chatd, dir, "bob", {"conversations"});
  CHECK(before.out.find("1  team  [group]  last=3  (2 unread)") != std::string::npos);

  CliRun read = RunChatCli(chatd, dir, "bob", {"--json", "mark-read", "--conversation", "1"});
  CHECK_MESSAGE(read.code == 0, read.out);
  CHECK(read.out.find("\"unread\":0,\"read_seq\":3") != std::string::npos);
  // A fresh cache (nothing local) gets the same exact count from the server.
  CliRun after = RunChatCli(chatd, dir, "bob", {"--json", "conversations"});
  CHECK(after.out.find("\"last_seq\":3,\"unread\":0,\"read_seq\":3") != std::string::npos);

  // The system message reads as a sentence.
  CliRun history = RunChatCli(chatd, dir, "bob", {"history", "--conversation", "1"});
  CHECK(history.out.find("[1#1] * alice created \"team\"") != std::string::npos);

  // Refusals exit non-zero: a conversation bob is not in, and an empty title.
  CliRun unknown = RunChatCli(chatd, dir, "bob", {"mark-read", "--conversation", "99"});
  CHECK(unknown.code == 1);
  CHECK(unknown.out.find("not known") != std::string::npos);
  CliRun empty = RunChatCli(chatd, dir, "alice", {"group-create", "--title", ""});
  CHECK(empty.code == 1);
  CHECK(empty.out.find("INVALID_ARGUMENT") != std::string::npos);
}

TEST_CASE("chat-cli: retention sets a conversation's retention, refused for a non-admin") {
  ChatdProcess chatd;
  REQUIRE(chatd.Start().ok());
  TempDir dir;
  CliRun sent = RunChatCli(chatd, dir, "alice", {"send", "--to", "bob", "hi"});
  REQUIRE_MESSAGE(sent.code == 0, sent.out);
  // Either member of a direct conversation may set it.
  CliRun forever = RunChatCli(chatd, dir, "bob", {"retention", "1", "-1"});
  CHECK_MESSAGE(forever.code == 0, forever.out);
  CHECK(forever.out.find("1  alice  last=") != std::string::npos);
  CHECK(forever.out.find("(kept forever)") != std::string::npos);
  CliRun listed = RunChatCli(chatd, dir, "alice", {"--json", "conversations"});
  CHECK(listed.out.find("\"retention_ms\":-1") != std::string::npos);
  CliRun history = RunChatCli(chatd, dir, "alice", {"history", "--conversation", "1"});
  CHECK(history.out.find("* bob set messages to be kept forever") != std::string::npos);

  CliRun group = RunChatCli(chatd, dir, "alice", {"group-create", "--title", "team", "bob"});
  REQUIRE_MESSAGE(group.code == 0, group.out);
  CliRun day = RunChatCli(chatd, dir, "alice", {"--json", "retention", "2", "86400000"});
  CHECK_MESSAGE(day.code == 0, day.out);
  CHECK(day.out.find("\"retention_ms\":86400000") != std::string::npos);
  CliRun member = RunChatCli(chatd, dir, "bob", {"retention", "2", "0"});
  CHECK(member.code == 1);
  CHECK(member.out.find("PERMISSION_DENIED") != std::string::npos);
  CliRun bad = RunChatCli(chatd, dir, "alice", {"retention", "2", "-5"});
  CHECK(bad.code == 1);
  CHECK(bad.out.find("INVALID_ARGUMENT") != std::string::npos);
}

// The SDK gives up on a request the server does not answer within --request-timeout-ms: the
// subcommand says so and exits 3, as when it waits longer than --timeout-ms itself.
TEST_CASE("chat-cli: a request the SDK gives up on exits 3 with the reason") {
  // Every commit waits a second for more to commit with (--commit-delay-min-batch 0: whatever
  // the load), so the server answers group-create a second late.
  ChatdProcess chatd(
      ChatdOptions{.extra_flags = {"--commit-delay-ms", "1000", "--commit-delay-min-batch", "0"}});
  REQUIRE(chatd.Start().ok());
  TempDir dir;
  CliRun run = RunChatCli(
      chatd, dir, "alice",
      {"--request-timeout-ms", "100", "--timeout-ms", "20000", "group-create", "--title", "team"});
  CHECK_MESSAGE(run.code == 3, run.out);
  CHECK(run.out.find("group-create: DEADLINE_EXCEEDED: no answer from the server within 100 ms") !=
        std::string::npos);
  CHECK(run.out.find("no answer in time") == std::string::npos);  // not chat-cli's own wait
  CliRun json = RunChatCli(chatd, dir, "alice",
                           {"--json", "--request-timeout-ms", "100", "--timeout-ms", "20000",
                            "group-create", "--title", "team"});
  CHECK_MESSAGE(json.code == 3, json.out);
  CHECK(json.out.find("{\"type\":\"error\",\"error\":\"DEADLINE_EXCEEDED: no answer from the "
                      "server within 100 ms\"}") != std::string::npos);

  // Below the SDK's least: a usage error naming the flag, before any connection.
  CliRun low = RunChatCli(chatd, dir, "alice", {"--request-timeout-ms", "99", "conversations"});
  CHECK_MESSAGE(low.code == 2, low.out);
  CHECK(low.out.find("--request-timeout-ms") != std::string::npos);
}

std::string CliPath() { return std::string(CHAT_BINARY_DIR) + "/examples/chat-cli"; }

// Runs `script` with /bin/sh in `dir`; returns its exit code and output.
CliRun RunShell(const TempDir& dir, const std::string& script) {
  static std::atomic<int> runs{0};
  const std::string log = dir.File("sh-" + std::to_string(++runs) + ".log");
  Result<int> code = RunProcess({"/bin/sh", "-c", script}, dir.path(), log, 60'000);
  REQUIRE(code.ok());
  return {*code, ReadFile(log)};
}

// How many times `part` occurs in `text`.
size_t Count(const std::string& text, const std::string& part) {
  size_t n = 0;
  for (size_t at = text.find(part); at != std::string::npos; at = text.find(part, at + 1)) ++n;
  return n;
}

std::string Connection(const ChatdProcess& chatd, const std::string& user) {
  return "--url " + chatd.url() + " --token " + chatd.Token(user) + " --device " + user + "-cli";
}

TEST_CASE("chat-cli: interactive mode never sends a mistyped command, and // sends a slash") {
  ChatdProcess chatd;
  REQUIRE(chatd.Start().ok());
  TempDir dir;
  CliRun run =
      RunShell(dir, "printf '/open bob\\n/helo\\n/add\\n//slash\\nhello\\n/help\\n/quit \\n' | " +
                        CliPath() + " " + Connection(chatd, "alice") + " --cache alice.db");
  CHECK_MESSAGE(run.code == 0, run.out);
  CHECK(run.out.find("* unknown command or missing argument: /helo") != std::string::npos);
  CHECK(run.out.find("* /open a conversation first") == std::string::npos);
  // /add without users needs a group; /help printed the commands again.
  CHECK(run.out.find("/help  /quit") != std::string::npos);
  // What was queued goes out (flush from the same cache), and only that.
  CliRun flush = RunChatCli(chatd, dir, "alice", {"--cache", "alice.db", "flush"});
  CHECK_MESSAGE(flush.code == 0, flush.out);
  CliRun history = RunChatCli(chatd, dir, "bob", {"--json", "history", "--conversation", "1"});
  CHECK_MESSAGE(history.code == 0, history.out);
  const size_t slash = history.out.find("\"body\":\"/slash\"");
  const size_t hello = history.out.find("\"body\":\"hello\"");
  REQUIRE(slash != std::string::npos);
  REQUIRE(hello != std::string::npos);
  CHECK(slash < hello);
  CHECK(history.out.find("helo\"") == std::string::npos);
  CHECK(history.out.find("\"body\":\"/add\"") == std::string::npos);
}

TEST_CASE("chat-cli: an unreadable token file and outbox commands without --cache exit 2") {
  ChatdProcess chatd;
  REQUIRE(chatd.Start().ok());
  TempDir dir;
  CliRun missing = RunShell(
      dir, CliPath() + " --url " + chatd.url() + " --token-file missing.txt conversations");
  CHECK(missing.code == 2);
  CHECK(missing.out.find("cannot read --token-file missing.txt") != std::string::npos);
  REQUIRE(WriteFile(dir.File("empty.txt"), "\n"));
  CliRun empty =
      RunShell(dir, CliPath() + " --url " + chatd.url() + " --token-file empty.txt conversations");
  CHECK(empty.code == 2);
  // A token that can be read once (a pipe) is kept for the connection.
  CliRun piped =
      RunShell(dir, "printf '%s' '" + chatd.Token("alice") + "' | " + CliPath() + " --url " +
                        chatd.url() + " --token-file /dev/stdin --device a conversations");
  CHECK_MESSAGE(piped.code == 0, piped.out);
  // A token file written on Windows (CRLF) works.
  REQUIRE(WriteFile(dir.File("token.txt"), chatd.Token("alice") + "\r\n"));
  CliRun crlf = RunShell(dir, CliPath() + " --url " + chatd.url() +
                                  " --token-file token.txt --device a conversations");
  CHECK_MESSAGE(crlf.code == 0, crlf.out);
  for (const char* command : {"flush", "outbox"}) {
    CliRun run = RunChatCli(chatd, dir, "alice", {command});
    CHECK(run.code == 2);
    CHECK(run.out.find("give --cache") != std::string::npos);
  }
}

TEST_CASE("chat-cli: Ctrl-C ends interactive mode while it waits for a line (exit 130)") {
  ChatdProcess chatd;
  REQUIRE(chatd.Start().ok());
  TempDir dir;
  // The FIFO stays open for writing and empty: chat-cli waits in its read of the terminal.
  CliRun run = RunShell(dir, "mkfifo in && { " + CliPath() + " " + Connection(chatd, "alice") +
                                 " < in & pid=$!; exec 3>in; sleep 1; kill -INT $pid; "
                                 "wait $pid; echo rc=$?; }");
  CHECK_MESSAGE(run.out.find("rc=130") != std::string::npos, run.out);
}

TEST_CASE("chat-cli: flush exits 4 when the server refuses what it sends") {
  ChatdProcess chatd;
  REQUIRE(chatd.Start().ok());
  TempDir dir;
  REQUIRE(chatd.Terminate().ok());
  // Queued while the server is down: to a conversation alice is not in.
  CliRun queued = RunChatCli(chatd, dir, "alice",
                             {"--cache", "alice.db", "--timeout-ms", "500", "send",
                              "--conversation", "424242", "nobody reads this"});
  CHECK(queued.code == 3);
  REQUIRE(chatd.Restart().ok());
  CliRun flush = RunChatCli(chatd, dir, "alice", {"--cache", "alice.db", "flush"});
  CHECK_MESSAGE(flush.code == 4, flush.out);
  CHECK(flush.out.find("PERMISSION_DENIED") != std::string::npos);
}

TEST_CASE("chat-cli: a refused token exits 1 with the server's reason") {
  ChatdProcess chatd;
  REQUIRE(chatd.Start().ok());
  TempDir dir;
  const std::string url = " --url " + chatd.url() + " --device a ";
  CliRun bad = RunShell(dir, CliPath() + url + "--token bad send --to bob hi");
  CHECK_MESSAGE(bad.code == 1, bad.out);
  CHECK(bad.out.find("chat-cli: the server refused the token: UNAUTHENTICATED: malformed token") !=
        std::string::npos);
  CHECK_MESSAGE(Count(bad.out, "malformed token") == 1, bad.out);  // told once

  const std::string expired = chatd.Token("alice", -60'000);
  CliRun listed = RunShell(dir, CliPath() + url + "--token " + expired + " conversations");
  CHECK_MESSAGE(listed.code == 1, listed.out);
  CHECK(listed.out.find("refused the token: UNAUTHENTICATED: token expired") != std::string::npos);
  CHECK_MESSAGE(Count(listed.out, "token expired") == 1, listed.out);
  CHECK(listed.out.find("could not connect") == std::string::npos);

  // A token signed with a key the server does not have: its header names kid "nope".
  const std::string token = chatd.Token("alice");
  const std::string wrong_kid =
      "eyJhbGciOiJIUzI1NiIsImtpZCI6Im5vcGUifQ" + token.substr(token.find('.'));
  CliRun kid = RunShell(dir, CliPath() + url + "--token " + wrong_kid + " --json send --to bob hi");
  CHECK_MESSAGE(kid.code == 1, kid.out);
  CHECK(kid.out.find("UNAUTHENTICATED: unknown key id") != std::string::npos);

  // An expired token in --token-file is read again once (a refresher may have replaced it),
  // then the refusal is final too.
  REQUIRE(WriteFile(dir.File("expired.txt"), expired));
  CliRun file = RunShell(dir, CliPath() + url + "--token-file expired.txt send --to bob hi");
  CHECK_MESSAGE(file.code == 1, file.out);
  CHECK(file.out.find("refused the token: UNAUTHENTICATED: token expired") != std::string::npos);
  CHECK_MESSAGE(Count(file.out, "token expired") == 1, file.out);  // refused twice, told once

  // flush and tail end too, rather than wait for a connection that cannot come. What send
  // queued in --cache stays there.
  CliRun queued = RunShell(dir, CliPath() + url + "--token bad --cache a.db send --to bob kept");
  CHECK_MESSAGE(queued.code == 1, queued.out);
  CliRun flush = RunShell(dir, CliPath() + url + "--token bad --cache a.db flush");
  CHECK_MESSAGE(flush.code == 1, flush.out);
  CHECK(flush.out.find("refused the token: UNAUTHENTICATED: malformed token") != std::string::npos);
  CHECK_MESSAGE(Count(flush.out, "malformed token") == 1, flush.out);
  CliRun sent = RunShell(dir, CliPath() + url + "--token " + token + " --cache a.db flush");
  CHECK_MESSAGE(sent.code == 0, sent.out);
  CliRun history = RunChatCli(chatd, dir, "bob", {"history", "--conversation", "1"});
  CHECK_MESSAGE(history.out.find("[1#1] alice: kept") != std::string::npos, history.out);
  CliRun tail = RunShell(dir, CliPath() + url + "--token bad tail");
  CHECK_MESSAGE(tail.code == 1, tail.out);
  CHECK(tail.out.find("refused the token: UNAUTHENTICATED: malformed token") != std::string::npos);
  CHECK_MESSAGE(Count(tail.out, "malformed token") == 1, tail.out);
  // --log-level info brings back the SDK's own account of each connection.
  CliRun verbose = RunShell(dir, CliPath() + url + "--token bad --log-level info conversations");
  CHECK_MESSAGE(verbose.code == 1, verbose.out);
  CHECK(verbose.out.find("chat client: disconnecting: hello refused") != std::string::npos);
}

TEST_CASE("chat-cli: interactive mode ends when the server refuses the token (exit 1)") {
  ChatdProcess chatd;
  REQUIRE(chatd.Start().ok());
  TempDir dir;
  // The FIFO stays open for writing and empty: no line and no end of input ever come. timeout(1)
  // ends a chat-cli that waits anyway (exit 124).
  const std::string interactive =
      "timeout 30 " + CliPath() + " --url " + chatd.url() + " --device a --timeout-ms 5000 ";
  CliRun bad =
      RunShell(dir, "mkfifo in && exec 3<>in && " + interactive + "--token bad < in; echo rc=$?");
  CHECK_MESSAGE(bad.out.find("rc=1\n") != std::string::npos, bad.out);
  CHECK(bad.out.find("chat-cli: the server refused the token: UNAUTHENTICATED: malformed token") !=
        std::string::npos);
  CHECK_MESSAGE(Count(bad.out, "malformed token") == 1, bad.out);

  // An expired token in --token-file is read again once, then the refusal is final too.
  REQUIRE(WriteFile(dir.File("expired.txt"), chatd.Token("alice", -60'000)));
  CliRun file =
      RunShell(dir, "exec 3<>in && " + interactive + "--token-file expired.txt < in; echo rc=$?");
  CHECK_MESSAGE(file.out.find("rc=1\n") != std::string::npos, file.out);
  CHECK(file.out.find("refused the token: UNAUTHENTICATED: token expired") != std::string::npos);
  CHECK_MESSAGE(Count(file.out, "token expired") == 1, file.out);
}

TEST_CASE("chat-cli: interactive mode sends what was typed before it exits on EOF or /quit") {
  ChatdProcess chatd;
  REQUIRE(chatd.Start().ok());
  TempDir dir;
  CliRun first = RunChatCli(chatd, dir, "alice", {"send", "--to", "bob", "first"});
  REQUIRE_MESSAGE(first.code == 0, first.out);
  // No --cache: the outbox lives only as long as the process. The last line needs no newline.
  CliRun eof =
      RunShell(dir, "printf '/open 1\\nhello' | " + CliPath() + " " + Connection(chatd, "alice"));
  CHECK_MESSAGE(eof.code == 0, eof.out);
  CliRun quit = RunShell(dir, "printf '/open bob\\nagain\\n/quit\\n' | " + CliPath() + " " +
                                  Connection(chatd, "alice"));
  CHECK_MESSAGE(quit.code == 0, quit.out);
  CliRun history = RunChatCli(chatd, dir, "bob", {"history", "--conversation", "1"});
  CHECK_MESSAGE(history.out.find("[1#2] alice: hello") != std::string::npos, history.out);
  CHECK_MESSAGE(history.out.find("[1#3] alice: again") != std::string::npos, history.out);

  // A line longer than chat-cli buffers (4 MiB) ends it with exit 2 after the lines before it
  // are acknowledged; nothing of the long line is sent.
  CliRun long_line = RunShell(
      dir, "{ printf '/open bob\\nbefore\\n'; head -c 5000000 /dev/zero | tr '\\0' x; } | " +
               CliPath() + " " + Connection(chatd, "alice"));
  CHECK_MESSAGE(long_line.code == 2, long_line.out);
  CHECK(long_line.out.find("an input line is longer than 4194304 bytes") != std::string::npos);
  CliRun after = RunChatCli(chatd, dir, "bob", {"history", "--conversation", "1"});
  CHECK_MESSAGE(after.out.find("[1#4] alice: before") != std::string::npos, after.out);
  CHECK(after.out.find("#5]") == std::string::npos);

  // Refused by the server: exit 4 as for send.
  CliRun refused = RunShell(dir, "printf '/open 424242\\nnot yours\\n' | " + CliPath() + " " +
                                     Connection(chatd, "alice"));
  CHECK_MESSAGE(refused.code == 4, refused.out);
  CHECK(refused.out.find("(failed) PERMISSION_DENIED") != std::string::npos);

  // No server to take them: exit 3 and say so, rather than exit 0 and lose them.
  REQUIRE(chatd.Terminate().ok());
  CliRun down = RunShell(dir, "printf '/open bob\\nlost\\n' | " + CliPath() + " " +
                                  Connection(chatd, "alice") + " --timeout-ms 500");
  CHECK_MESSAGE(down.code == 3, down.out);
  CHECK(down.out.find("not all messages were acknowledged in time") != std::string::npos);
}

TEST_CASE("chat-cli: a negative duration or a non-decimal number exits 2 naming the flag") {
  ChatdProcess chatd;
  REQUIRE(chatd.Start().ok());
  TempDir dir;
  CliRun timeout = RunChatCli(chatd, dir, "alice", {"--timeout-ms", "-1", "conversations"});
  CHECK_MESSAGE(timeout.code == 2, timeout.out);
  CHECK(timeout.out.find("--timeout-ms") != std::string::npos);
  CliRun duration =
      RunChatCli(chatd, dir, "alice", {"presence", "--count", "1", "--duration-ms", "-5", "bob"});
  CHECK_MESSAGE(duration.code == 2, duration.out);
  CHECK(duration.out.find("--duration-ms") != std::string::npos);
  // Other argument errors CLI11 finds exit 2 too, rather than CLI11's own codes.
  CliRun missing = RunChatCli(chatd, dir, "alice", {"history"});
  CHECK_MESSAGE(missing.code == 2, missing.out);
  CliRun zero = RunChatCli(chatd, dir, "alice", {"--timeout-ms", "0", "--help"});
  CHECK_MESSAGE(zero.code == 0, zero.out);
  // A sign on an unsigned number would wrap to its largest value, and 0x10 would be 16.
  for (const char* bad : {"-1", "0x10"}) {
    CliRun id = RunChatCli(chatd, dir, "alice", {"history", "--conversation", bad});
    CHECK_MESSAGE(id.code == 2, id.out);
    CHECK(id.out.find("--conversation: a non-negative integer of decimal digits") !=
          std::string::npos);
  }
}

}  // namespace
}  // namespace chat::testing
