"""What train.py may use of the harness: a session with device, data, the training clock, and finish().

CONTRACT (implemented by the harness; train.py relies on exactly this):

    from harness import api
    session = api.start()                  # profile constants, device, seeds set
    session.device, session.seq_len, session.vocab_size, session.bos_id, session.time_budget
    session.autocast()                     # context manager: bf16 autocast on CUDA, nothing on CPU/MPS
    batches = session.train_batches(B)     # iterator of (inputs, targets), int64 (B, seq_len) on device
    progress = session.tick(loss)          # once per optimizer step, loss a float; returns the fraction of
                                           # the training budget spent (0..1); raises Diverged on nan/inf/>100
    session.done                           # True once the budget is spent
    session.finish(model)                  # hand the model over; the harness scores it (model(idx) -> logits)

The first `profile.warmup_steps` steps are kept off the clock (compilation); time before the clock runs is
bounded by `profile.max_startup_seconds`. The model's forward `model(idx)` must return logits (B, T, vocab).
"""
