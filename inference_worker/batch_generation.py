"""One /infer request on a BatchedModel, behind the same interface as the single-stream Generation.

The route checks the prompt, renders a chat with the model's chosen template (the same
ChatTemplate as the single-stream engine, so the text does not depend on N_PARALLEL), then
submits it to the decode loop; closing it gives the slot back at the loop's next step.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterator

from inference_worker.batch_prompt import BatchRequest, PromptTooLong
from inference_worker.batch_stream import GenerationFailed, ModelClosing, Stream
from inference_worker.batching import BatchedModel
from inference_worker.chat_templates import ChatTemplate
from inference_worker.engine import Generation, Piece
from inference_worker.output_options import completion_kwargs
from model_swap.errors import ApiError
from model_swap.web import GenerationRequest

log = logging.getLogger(__name__)


class BatchedGeneration(Generation):
    """A request that holds one slot of a BatchedModel (or waits for one) until it ends or is released."""

    def __init__(self, model: BatchedModel, name: str, n_ctx: int, release: Callable[[], None], chat: ChatTemplate):
        super().__init__(model.host, name, n_ctx, release, chat, logits_kept=False)
        self._model = model
        self._stream: Stream | None = None

    def stream(self, request: GenerationRequest) -> Iterator[Piece]:
        """Queue the request now (errors surface here, before any byte is sent); iterate for its pieces."""
        # Batched models are never opened with logprobs: asking for them is the same 400 as on
        # any model loaded without them; response_format becomes a grammar in the slot's sampler.
        grammar = completion_kwargs(request, logits_kept=False).get("grammar")
        chat_stop: tuple[str, ...] = ()
        if request.messages is not None:
            if self._chat_tokens is None:
                self.check_messages(request.messages)
            chat_stop = self.chat.stop
        batch_request = BatchRequest.from_generation(request, self._chat_tokens, chat_stop, grammar)
        try:
            self._stream = self._model.submit(batch_request)
        except PromptTooLong as err:
            raise ApiError(400, "prompt_too_long", str(err)) from None
        except ModelClosing as err:
            raise ApiError(409, "model_unloading", str(err)) from None
        except GenerationFailed as err:
            raise ApiError(500, "generation_failed", str(err)) from None
        except ValueError as err:  # a sampling setting or grammar the batched sampler cannot take
            raise ApiError(400, "invalid_request", str(err)) from None
        return self._pieces(self._stream)

    def _pieces(self, stream: Stream) -> Iterator[Piece]:
        try:
            for text in stream:
                yield Piece(text)
            self.finish_reason = stream.finish_reason
        except GenerationFailed as err:
            # Before the first piece this is still an error response; later the stream is cut short.
            raise ApiError(500, "generation_failed", str(err)) from None
        finally:
            stream.close()

    def release(self) -> None:
        """Give the slot back (at the decode loop's next step) and end the request (idempotent)."""
        if self._stream is not None:
            self._stream.close()
        super().release()
