// embed_server: the smallest program that embeds the chat server (see include/chat/server.h).
//
//   CHAT_SECRET=$(openssl rand -hex 32) ./embed_server
//
// Tokens for clients are HS256 JWTs signed with the same secret (`chatd token` mints them).
#include <cstdlib>
#include <iostream>

#include "chat/chat.h"

int main() {
  const char* secret = std::getenv("CHAT_SECRET");  // at least 32 bytes
  if (secret == nullptr) {
    std::cerr << "set CHAT_SECRET to the token signing secret (at least 32 bytes)\n";
    return 2;
  }
  auto store = chat::NewSqliteStore({.path = "chat.db"});
  auto auth = chat::NewJwtAuthenticator({.secrets = {{"", secret}}});
  if (!store.ok() || !auth.ok()) {
    std::cerr << (store.ok() ? auth.status() : store.status()).ToString() << "\n";
    return 1;
  }
  chat::ServerOptions options;
  options.port = 8080;
  options.store = *store;
  options.authenticator = *auth;
  auto server = chat::Server::Open(std::move(options));
  if (!server.ok()) {
    std::cerr << server.status().ToString() << "\n";
    return 1;
  }
  std::cout << "listening on ws://127.0.0.1:" << (*server)->port() << "\n";
  return (*server)->Run().ok() ? 0 : 1;  // until Shutdown() from another thread
}
