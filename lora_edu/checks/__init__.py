"""Checkers for the exercises: each takes your function, tries it, and says what is wrong.

A checker prints one line when your answer is right and raises :class:`CheckFailed`
with a sentence about the first thing that is wrong otherwise. The reference
answers are the package's own functions, the same ones the chapters use. One module
per chapter, named after its notebook (``ch02_lora_from_scratch`` checks
``02_lora_from_scratch.ipynb``), so that none shares a name with a package module;
import them all from here.

In Jupyter (IPython), a failed check shows its message alone: a traceback would print
the checker's own lines, and with them the answer.
"""

from lora_edu.checks.core import CheckFailed
from lora_edu.checks.ch00_meet_the_model import (
    check_best_temperature,
    check_cross_entropy,
    check_next_token_probs,
    check_parameter_count,
)
from lora_edu.checks.ch01_svd_intuition import (
    check_low_rank_factors,
    check_low_rank_parameters,
    check_rank_for_energy,
    check_rank_keeping_gain,
)
from lora_edu.checks.ch02_lora_from_scratch import (
    check_count_lora_parameters,
    check_inject_lora,
    check_lora_forward,
    check_merge_unmerge,
    check_smallest_rank,
)
from lora_edu.checks.ch03_lora_plus import (
    check_loraplus_groups,
    check_lr_by_parameter,
    check_sign_descent_step,
    check_toy_best_pair,
)
from lora_edu.checks.ch04_nf4_quantization import (
    check_bits_per_parameter,
    check_lloyd_max_levels,
    check_nf4_values,
    check_pack_unpack,
    check_quantize_block,
)
from lora_edu.checks.ch05_qlora_gpt2 import (
    check_blocksize_experiment,
    check_fine_tuning_bytes,
    check_quantize_and_count,
    check_training_step,
)
from lora_edu.checks.ch06_dora import (
    check_dora_merge_conv1d,
    check_dora_serving,
    check_dora_unmerge_conv1d,
    check_factored_row_norms,
    check_magnitude_only,
)
from lora_edu.checks.ch07_serving_many_adapters import check_pool_bytes, check_ragged_delta, check_unpad_pool
from lora_edu.checks.ch08_peft_family import (check_adamix_exact_merge, check_ia3_merge, check_prompt_tuned_logits,
                                              check_vera_merge)



def _show_failed_checks_as_a_message() -> None:
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is None:
        return

    def message_only(shell, etype, value, tb, tb_offset=None):
        lines = [f"{etype.__name__}: {value}"]
        shell._showtraceback(etype, value, lines)  # IPython leaves the showing to the handler
        return lines

    shell.set_custom_exc((CheckFailed,), message_only)


_show_failed_checks_as_a_message()

__all__ = [
    "CheckFailed",
    "check_adamix_exact_merge",
    "check_best_temperature",
    "check_bits_per_parameter",
    "check_blocksize_experiment",
    "check_count_lora_parameters",
    "check_cross_entropy",
    "check_dora_merge_conv1d",
    "check_dora_serving",
    "check_dora_unmerge_conv1d",
    "check_factored_row_norms",
    "check_fine_tuning_bytes",
    "check_ia3_merge",
    "check_inject_lora",
    "check_lloyd_max_levels",
    "check_lora_forward",
    "check_loraplus_groups",
    "check_low_rank_factors",
    "check_low_rank_parameters",
    "check_lr_by_parameter",
    "check_magnitude_only",
    "check_merge_unmerge",
    "check_next_token_probs",
    "check_nf4_values",
    "check_pack_unpack",
    "check_parameter_count",
    "check_pool_bytes",
    "check_prompt_tuned_logits",
    "check_quantize_and_count",
    "check_quantize_block",
    "check_ragged_delta",
    "check_rank_for_energy",
    "check_rank_keeping_gain",
    "check_sign_descent_step",
    "check_smallest_rank",
    "check_toy_best_pair",
    "check_training_step",
    "check_unpad_pool",
    "check_vera_merge",
]
