// Symbol visibility. The libraries are compiled with -fvisibility=hidden, so only declarations
// marked CHAT_EXPORT form the API of a shared build; internals stay private to the library.
#ifndef CHAT_EXPORT_H_
#define CHAT_EXPORT_H_

#define CHAT_EXPORT [[gnu::visibility("default")]]

#endif  // CHAT_EXPORT_H_
