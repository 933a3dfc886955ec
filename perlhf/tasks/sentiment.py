"""The real-model task: steer a chat model's opinions towards positive sentiment, judged by VADER.

The classic first RLHF task for language models (Ziegler et al., 2019) with two changes that make
it honest on a real model: the policy is a pretrained instruction-tuned model
(SmolLM2-135M-Instruct, ``perlhf.import_gguf``), and the "human" is VADER (Hutto & Gilbert,
2014; the ``vaderSentiment`` package), a published rule-based sentiment analyser the project did
not write. Its ``compound`` score in [−1, 1] of the response is the gold score.

Prompts ask for a one-sentence opinion on one of several hundred topics (everyday things,
chores, places, technology, weather, food, work…) in one of six phrasings, as a chat user turn.
Topics, not phrasings, are split: a fixed fifth of them never appears in any training stage, so
held-out evaluation measures whether the policy learned "be positive" rather than topic facts.

Preference pairs are made the way real ones are: sample several responses of the starting
policy per prompt, score them with the judge, and label pairs through Bradley–Terry noise
(``perlhf.tasks.base.bradley_terry_label``); the held-out pairs (held-out topics) are labelled
without noise, so reward-model accuracy is measured against the judge itself.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator, Sequence
from functools import cache
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from perlhf.tasks.base import Prompt, Split, bradley_terry_label

VADER_INSTALL = "pip install vaderSentiment"
_TOPICS = """
cats; dogs; hamsters; goldfish; spiders; snakes; pigeons; mosquitoes; wasps; bees; owls; sharks;
horses; cows; sheep; rats; crows; jellyfish; squirrels; parrots; frogs; cockroaches; ants; whales;
pizza; broccoli; coffee; tea; sushi; chocolate; spinach; fast food; cold soup; burnt toast;
airline food; salad; pineapple on pizza; instant noodles; tofu; oatmeal; cheese; hot sauce;
energy drinks; sparkling water; fruitcake; leftovers; street food; school lunches; vegetables;
rain; snow; heat waves; fog; thunderstorms; humidity; winter; summer; autumn; spring; wind;
hail; sunrise; sunsets; cloudy days; droughts; floods; the weather forecast;
Mondays; Fridays; weekends; holidays; birthdays; alarm clocks; early mornings; late nights;
deadlines; meetings; email; open-plan offices; working from home; commuting; overtime;
job interviews; performance reviews; small talk; networking events; office coffee; layoffs;
homework; exams; group projects; lectures; textbooks; grades; school uniforms; detention;
student loans; libraries; online courses; spelling tests; math class; history class;
taxes; bureaucracy; paperwork; queues; traffic jams; parking tickets; speed bumps; potholes;
public transport; airports; delayed trains; road works; toll roads; customer service hotlines;
waiting rooms; insurance forms; bank fees; rent; mortgages; inflation; budgets; bills;
smartphones; social media; video games; television; streaming services; podcasts; robots;
artificial intelligence; self-driving cars; electric cars; printers; passwords; pop-up ads;
software updates; spam calls; smart watches; virtual reality; cryptocurrency; the internet;
online shopping; video calls; autocorrect; chatbots; computer viruses; tablets; e-books;
cooking; cleaning; laundry; ironing; washing dishes; vacuuming; gardening; mowing the lawn;
taking out the trash; moving house; assembling furniture; grocery shopping; doing chores;
running; swimming; cycling; yoga; hiking; camping; fishing; knitting; painting; chess;
football; basketball; golf; tennis; marathons; the gym; push-ups; diets; dentists; flu shots;
hospitals; colds; allergies; hiccups; headaches; sleep; naps; snoring; insomnia; vitamins;
cities; villages; the countryside; beaches; mountains; deserts; forests; islands; rivers;
skyscrapers; suburbs; shopping malls; parks; museums; zoos; theme parks; cruise ships;
hotels; motels; campsites; train stations; lighthouses; castles; bridges; caves; volcanoes;
music; jazz; opera; heavy metal; karaoke; concerts; poetry; novels; comic books; cartoons;
horror movies; musicals; reality TV; the news; documentaries; art galleries; sculptures;
photography; dancing; theatre; circus clowns; magic tricks; board games; puzzles; crosswords;
neighbours; relatives; in-laws; roommates; strangers; teenagers; toddlers; grandparents;
teachers; lawyers; politicians; doctors; firefighters; mail carriers; landlords; tourists;
friendship; honesty; patience; ambition; competition; failure; success; change; routine;
boredom; silence; noise; crowds; loneliness; gossip; criticism; advice; surprises; secrets;
New Year's resolutions; weddings; funerals; graduations; family reunions; first dates;
long-distance relationships; break-ups; apologies; compliments; gifts; thank-you notes;
plastic bags; recycling; litter; pollution; climate change; solar panels; wind turbines;
nuclear power; fossil fuels; zoos in cities; trees; flowers; weeds; mushrooms; moss;
umbrellas; socks; neckties; high heels; sunglasses; backpacks; suitcases; keys; wallets;
candles; mirrors; clocks; stairs; elevators; escalators; revolving doors; doorbells;
space travel; the moon; Mars; astronauts; telescopes; dinosaurs; fossils; volcanology;
mathematics; physics; chemistry; biology; philosophy; economics; statistics; grammar;
spelling; handwriting; typewriters; fountain pens; sticky notes; calendars; to-do lists
"""
TOPICS: tuple[str, ...] = tuple(dict.fromkeys(t.strip() for t in _TOPICS.replace("\n", " ").split(";")))
TEMPLATES: tuple[str, ...] = (
    "What do you think of {topic}? Answer in one sentence.",
    "How do you feel about {topic}? Answer in one sentence.",
    "Give me your opinion of {topic} in one sentence.",
    "Describe {topic} in one sentence.",
    "Tell me about {topic} in one sentence.",
    "What is your view on {topic}? Reply in one sentence.",
)
HELDOUT_FRACTION = 0.2
SPLIT_SEED = 1234
"""Fixed: the held-out topics are the same in every run, whatever the run's seed."""


def topics(split: Split) -> list[str]:
    """The topics of ``split``: a fixed random fifth is held out of every training stage."""
    order = list(TOPICS)
    random.Random(SPLIT_SEED).shuffle(order)
    n_heldout = round(len(order) * HELDOUT_FRACTION)
    return sorted(order[:n_heldout] if split == "heldout" else order[n_heldout:])


def user_turn(topic: str, template: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": TEMPLATES[template].format(topic=topic)}]


def prompt_pool(split: Split) -> list[list[dict[str, str]]]:
    """Every (topic, phrasing) chat prompt of ``split``."""
    return [user_turn(t, i) for t in topics(split) for i in range(len(TEMPLATES))]


@cache
def _analyzer() -> Any:
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError as err:
        raise ImportError(f"the sentiment task's judge is VADER: {VADER_INSTALL}") from err
    return SentimentIntensityAnalyzer()


def vader_compound(text: str) -> float:
    """VADER's compound sentiment of ``text`` in [−1, 1] (0 for neutral or empty text)."""
    return float(_analyzer().polarity_scores(text)["compound"])


def judge(prompts: Sequence[Prompt], responses: Sequence[str], **row: Any) -> list[float]:
    """Gold scores: VADER compound sentiment of each response (the prompt is not scored)."""
    if len(prompts) != len(responses):
        raise ValueError(f"judge: {len(prompts)} prompts but {len(responses)} responses")
    return [vader_compound(r) for r in responses]


class SentimentTask:
    """Positive-sentiment steering of a chat model, judged by VADER."""

    name = "sentiment"

    def prompts(self, split: Split) -> list[Prompt]:
        return list(prompt_pool(split))

    def judge(self, prompts: Sequence[Prompt], responses: Sequence[str], **row: Any) -> list[float]:
        return judge(prompts, responses)


# ------------------------------------------------------------------------------ preference data


def preference_rows(
    prompts: Sequence[list[dict[str, str]]],
    responses: Sequence[Sequence[str]],
    pairs_per_prompt: int,
    temperature: float,
    seed: int = 0,
    min_gap: float = 0.05,
) -> Iterator[dict[str, Any]]:
    """Conversational preference rows from ``responses[i]`` (several samples of prompt ``i``).

    For each prompt, up to ``pairs_per_prompt`` distinct pairs whose judge scores differ by at
    least ``min_gap`` (a rater calls closer pairs a tie; such pairs are dropped as preference
    datasets drop ties), labelled through Bradley–Terry noise at ``temperature`` (0: noiseless).
    Rows carry both judge scores (``score_chosen``, ``score_rejected``) for analysis.
    """
    rng = random.Random(seed)
    for prompt, samples in zip(prompts, responses, strict=True):
        scores = judge([prompt] * len(samples), samples)
        candidates = [
            (i, j)
            for i, j in itertools.combinations(range(len(samples)), 2)
            if abs(scores[i] - scores[j]) >= min_gap and samples[i].strip() and samples[j].strip()
        ]
        rng.shuffle(candidates)
        for i, j in candidates[:pairs_per_prompt]:
            a_wins = bradley_terry_label(scores[i], scores[j], temperature, rng)
            chosen, rejected = (i, j) if a_wins else (j, i)
            yield {
                "prompt": prompt,
                "chosen": [{"role": "assistant", "content": samples[chosen].strip()}],
                "rejected": [{"role": "assistant", "content": samples[rejected].strip()}],
                "score_chosen": scores[chosen],
                "score_rejected": scores[rejected],
            }


@torch.no_grad()
def sample_responses(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[list[dict[str, str]]],
    samples_per_prompt: int,
    max_new_tokens: int,
    temperature: float,
    batch_size: int = 32,
    seed: int = 0,
) -> list[list[str]]:
    """``samples_per_prompt`` sampled responses per chat prompt (seeded), decoded without special
    tokens; prompt-major."""
    from perlhf.evaluate import sample_batches

    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    rows = [t for t in texts for _ in range(samples_per_prompt)]
    flat: list[str] = []
    for batch in sample_batches(model, tokenizer, rows, max_new_tokens, temperature, batch_size, seed):
        flat.extend(batch.responses)
    return [flat[i : i + samples_per_prompt] for i in range(0, len(flat), samples_per_prompt)]


def gold_score(prompt: Prompt, response: str) -> float:
    """One response's gold score (``perlhf.callbacks.GoldScore``'s scorer signature)."""
    return vader_compound(response)
