"""A RULER-style synthetic long-context suite (Hsieh et al., arXiv 2404.06654), generated offline.

Everything is built here from the paper's task definitions, deterministically from a seed, with no download:
prompts are fitted to a target length in tokens of the model's own tokenizer, a model generates greedily,
and RULER's string-match metrics score the output (in percent).

Usage::

    from lighttransfer.evaluation.ruler import build_samples, run_samples, markdown_table

    samples = build_samples(tokenizer, lengths=[4096, 8192], samples_per_task=20, seed=0)
    result = run_samples(sequence, samples, tokenizer=tokenizer)   # sequence() yields (model, after_prefill)
    print(markdown_table({"dense": result}))

Tasks (:data:`TASKS`; RULER's names, with the one exception of our QA task):

================ ====================================================================== ====== ======
task             what the prompt holds / what is asked                                  tokens metric
================ ====================================================================== ====== ======
niah_single_1    one needle "A special magic number for <key> is: <7 digits>." in noise    128   all
niah_single_2    the same in the essay haystack                                            128   all
niah_single_3    essay, the value is a UUID                                                128   all
niah_multikey_1  essay, 4 needles with different keys, one asked about                     128   all
niah_multikey_2  a haystack of distractor needles only (word keys, numbers)                128   all
niah_multikey_3  a haystack of needles only, UUID keys and UUID values                     128   all
niah_multivalue  essay, 4 needles with the same key; all 4 values asked for                128   all
niah_multiquery  essay, 4 keys, all 4 asked at once                                        128   all
vt               noise with ``VAR A = 12345.`` ``VAR B = VAR A.`` (1 chain, 1 hop):         30   all
                 which variables hold 12345?
cwe              a numbered word list, 10 words far more frequent: name them               120   all
fwe              coded words with Zipf(2) counts: name the 3 most frequent                  50   all
qa_haystack      ours ("lighttransfer-qa"): a sentence of the essay with a (not too         32   part
                 frequent) name is planted; which name is in the sentence that begins
                 with "<its first words>"?
================ ====================================================================== ====== ======

Haystacks (:mod:`.haystack`): ``noise`` repeats "The grass is green. The sky is blue. The sun is yellow.
Here we go. There and back again."; ``essay`` is real text passed by the caller (by default lighttransfer's
shipped calibration text, ``calibration.SHIPPED_TEXT``), read from the start of a random sentence, cut at a
word boundary, needles inserted between sentences at depths drawn from a 40-point grid.

Words (:mod:`.words`): no third-party word list; keys are two words from a vocabulary derived from the
shipped text, numbers and UUIDs come from the sample's ``random.Random``.

Fitting (:mod:`.fit`): binary search on the haystack size (words; needles for needle-only haystacks, topped
up with a few noise words before the needles; list items for cwe/fwe), so that ``len(input_ids) <= length``
and short of it by less than one unit. A length too short for a task's fixed parts raises
:class:`~lighttransfer.errors.LightTransferError` naming the task and the length.

Differences from RULER, stated plainly: the template wording is ours (same structure and answer prefixes);
``vt`` defaults to 1 hop (RULER's published configuration uses more; set ``VariableTracking(num_hops=4)``);
``cwe`` scales the common words' count down below 4096 tokens and uses no in-context example; ``fwe`` uses
exact Zipf counts rather than sampled ones, so its answer is never tied; RULER's SQuAD/HotpotQA tasks
(``qa_1``/``qa_2``) are replaced by ``qa_haystack``, which tests retrieval of one planted sentence, not
reading comprehension.
"""

from .fit import Fit, fit_prompt
from .haystack import NOISE, Haystack, essay_haystack, noise_haystack
from .sample import RulerSample
from .scoring import aggregate, score, string_match_all, string_match_part
from .suite import (
    DEFAULT_TASKS,
    TASKS,
    RulerResult,
    build_samples,
    check_tasks,
    draw_scores,
    greedy_generate,
    greedy_generate_batch,
    heatmap,
    markdown_table,
    run_samples,
    task_order,
)
from .tasks import CommonWords, FrequentWords, NeedleTask, PlantedSentenceQA, VariableTracking

__all__ = [
    "task_order",
    "DEFAULT_TASKS",
    "NOISE",
    "TASKS",
    "CommonWords",
    "Fit",
    "FrequentWords",
    "Haystack",
    "NeedleTask",
    "PlantedSentenceQA",
    "RulerResult",
    "RulerSample",
    "VariableTracking",
    "aggregate",
    "build_samples",
    "check_tasks",
    "essay_haystack",
    "fit_prompt",
    "greedy_generate",
    "greedy_generate_batch",
    "draw_scores",
    "heatmap",
    "markdown_table",
    "noise_haystack",
    "run_samples",
    "score",
    "string_match_all",
    "string_match_part",
]
