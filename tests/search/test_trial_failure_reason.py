from search.trial import failure_reason


def test_recipe_reason_is_taken_from_a_wrapped_worker_traceback():
    text = ("Training failed.\nTraceback (most recent call last):\n  File \"recipe.py\", line 9\n"
            "trainers.errors.TrialFailed: diverged at step 12 (loss=nan)\n")
    assert failure_reason(RuntimeError(text)) == "diverged at step 12 (loss=nan)"


def test_other_errors_keep_their_innermost_exception_line():
    text = "worker died\nTraceback...\nValueError: bad shape\nRuntimeError: CUDA error: device-side assert"
    assert failure_reason(RuntimeError(text)) == "RuntimeError: CUDA error: device-side assert"


def test_plain_message_is_kept():
    assert failure_reason(KeyError("x")) == "KeyError: 'x'"
