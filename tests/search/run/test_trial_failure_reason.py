from search.run.protocol import failure_reason


def test_recipe_reason_is_taken_from_a_wrapped_worker_traceback():
    text = ("Training failed.\nTraceback (most recent call last):\n  File \"recipe.py\", line 9\n"
            "trainers.errors.TrialFailed: diverged at step 12 (loss=nan)\n")
    assert failure_reason(RuntimeError(text)) == "diverged at step 12 (loss=nan)"


def test_other_errors_keep_their_innermost_exception_line():
    text = "worker died\nTraceback...\nValueError: bad shape\nRuntimeError: CUDA error: device-side assert"
    assert failure_reason(RuntimeError(text)) == "RuntimeError: CUDA error: device-side assert"


def test_plain_message_is_kept():
    assert failure_reason(KeyError("x")) == "KeyError: 'x'"


def test_only_a_lost_worker_is_worth_a_retry():
    from search.run.protocol import worker_lost

    seen = ("WorkerGroupError: The actor is dead because its worker process has died. Worker exit type: "
            "SYSTEM_ERROR Worker exit detail: Worker unexpectedly exits with a connection error code 2.")
    assert worker_lost(seen)
    assert worker_lost("ActorDiedError: The actor died unexpectedly before finishing this task.")
    for deterministic in ("diverged at step 3 (loss=nan)", "out of memory at step 2: CUDA out of memory",
                          "OutOfMemoryError: Task was killed due to the node running low on memory.",
                          "ValueError: target module q_proj not found"):
        assert not worker_lost(deterministic), deterministic
