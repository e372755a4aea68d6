"""Default routing keys: which tasks should land on the same backend."""

from __future__ import annotations

import hashlib

from server.model.task import ChatInput, Task


def routing_key(task: Task) -> str:
    """The client's key if set; for chat, the model plus the conversation's opening (system
    prompt and first user turn), so conversations that share a prefix reuse one backend's
    prompt cache; otherwise the task id, which spreads tasks evenly."""
    if task.spec.routing_key:
        return task.spec.routing_key
    spec = task.spec.input
    if isinstance(spec, ChatInput):
        digest = hashlib.blake2b(spec.model.encode(), digest_size=16)
        first_user_seen = False
        for message in spec.messages:
            if message.role == "user":
                if first_user_seen:
                    break
                first_user_seen = True
            digest.update(b"\x00" + message.role.encode() + b"\x00" + message.content.encode())
        return digest.hexdigest()
    return task.id
