// Uses the installed chat::core: Status values, and a JWT signed and verified round trip.
#include <chrono>
#include <cstdio>
#include <string>

#include "chat/auth.h"
#include "chat/status.h"
#include "chat/version.h"

int main() {
  const chat::Status denied = chat::PermissionDenied("not a member");
  if (denied.ok() || denied.code() != chat::Code::kPermissionDenied ||
      denied.ToString() != "PERMISSION_DENIED: not a member") {
    std::fprintf(stderr, "unexpected status: %s\n", denied.ToString().c_str());
    return 1;
  }

  const std::string secret(32, 'k');
  const int64_t now = std::chrono::duration_cast<std::chrono::milliseconds>(
                          std::chrono::system_clock::now().time_since_epoch())
                          .count();
  chat::Result<std::string> token = chat::SignJwt(secret, "", "alice", now, 60'000);
  if (!token.ok()) {
    std::fprintf(stderr, "SignJwt: %s\n", token.status().ToString().c_str());
    return 1;
  }
  auto verifier = chat::NewJwtAuthenticator({.secrets = {{"", secret}}});
  if (!verifier.ok()) {
    std::fprintf(stderr, "NewJwtAuthenticator: %s\n", verifier.status().ToString().c_str());
    return 1;
  }
  chat::Result<chat::Identity> identity = (*verifier)->Verify(*token, now);
  if (!identity.ok() || identity->user_id != "alice") {
    std::fprintf(stderr, "Verify: %s\n", identity.status().ToString().c_str());
    return 1;
  }
  chat::Result<chat::Identity> forged = (*verifier)->Verify(*token + "x", now);
  if (forged.ok() || forged.status().code() != chat::Code::kUnauthenticated) {
    std::fprintf(stderr, "a tampered token was not refused\n");
    return 1;
  }
  std::printf("chat %s package works\n", CHAT_VERSION_STRING);
  return 0;
}
