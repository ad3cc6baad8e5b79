// Umbrella header: the whole public API of the chat SDK.
#ifndef CHAT_CHAT_H_
#define CHAT_CHAT_H_

#include "chat/auth.h"
#include "chat/client.h"
#include "chat/clock.h"
#include "chat/log.h"
#include "chat/presence.h"
#include "chat/push.h"
#include "chat/server.h"
#include "chat/status.h"
#include "chat/store.h"
#include "chat/types.h"
#include "chat/version.h"

#endif  // CHAT_CHAT_H_
