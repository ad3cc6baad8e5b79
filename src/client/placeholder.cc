// The client library is built in src/client; this file keeps the target non-empty until the
// client Session lands.
namespace chat::client_internal {
int Placeholder() { return 0; }
}  // namespace chat::client_internal
