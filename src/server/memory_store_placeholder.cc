namespace chat::server_internal {
int Placeholder() { return 0; }
}  // namespace chat::server_internal
