"""Astria Encode: the prompt's positive and negative text as CONDITIONING, weighted like Astria's use_lpw (diffusers'
long-prompt-weighting pipelines), A1111, ComfyUI, or not at all.

Glue only: the host's tokenizers and encoders do the tokenizing and encoding; A1111's and diffusers' chunking and
weighting are nodes/core/attention.py and prompt_tokens.py, bare embedding names nodes/core/embeddings.py.
"""
import logging

import comfy.sd1_clip
import comfy.sdxl_clip
import folder_paths
from transformers import CLIPTokenizer, CLIPTokenizerFast

from ..core import attention, embeddings, prompt_tokens, settings
from ._api import io
from .types import AstriaPromptType, node_schema

log = logging.getLogger("astria")
FROM_PROMPT = "from prompt"
WEIGHTING_CHOICES = [FROM_PROMPT, *settings.WEIGHTING_MODES]  # the nodes' weighting widget
COMMA_TOKEN_TEXT = ",</w>"  # how CLIP's vocabulary spells a comma ending a word


def weighting_for(prompt, choice):
    """The weighting mode: the node's choice, or from the prompt's use_lpw (docs/astria-syntax.md section 6: true or
    unset -> lpw, false -> none)."""
    if choice != FROM_PROMPT:
        return choice
    return settings.weighting_from_prompt(prompt)


def encode_text(clip, text):
    """CONDITIONING of ComfyUI prompt text through the host's own tokenizer and encoder (CLIPTextEncode)."""
    tokens = clip.tokenize(text)
    return clip.encode_from_tokens_scheduled(tokens)


def _is_clip_tokenizer(tokenizer):
    """Whether a host tokenizer is a CLIP one with A1111's frame: start and end tokens around 75."""
    return (isinstance(tokenizer, comfy.sd1_clip.SDTokenizer)
            and isinstance(tokenizer.tokenizer, (CLIPTokenizer, CLIPTokenizerFast))
            and tokenizer.start_token is not None and tokenizer.end_token is not None
            and tokenizer.tokenizer_adds_end_token and tokenizer.max_length == prompt_tokens.FRAMED_LENGTH)


def clip_encoders(clip):
    """[(token key, tokenizer, encoder)] in the host's channel order for SD1.x-style CLIPs and SDXL; else None."""
    tokenizer, model = clip.tokenizer, clip.cond_stage_model
    if isinstance(tokenizer, comfy.sdxl_clip.SDXLTokenizer) and isinstance(model, comfy.sdxl_clip.SDXLClipModel):
        encoders = [("l", tokenizer.clip_l, model.clip_l), ("g", tokenizer.clip_g, model.clip_g)]
    elif (isinstance(tokenizer, comfy.sd1_clip.SD1Tokenizer) and isinstance(model, comfy.sd1_clip.SD1ClipModel)
          and tokenizer.clip_name == model.clip_name):
        encoders = [(tokenizer.clip_name, getattr(tokenizer, tokenizer.clip), getattr(model, model.clip))]
    else:
        return None
    if all(_is_clip_tokenizer(sub) and isinstance(encoder, comfy.sd1_clip.SDClipModel)
           for _, sub, encoder in encoders):
        return encoders
    return None


class _ClipVocabularies:
    """Per text encoder of a CLIP: the Vocabulary for prompt_tokens, embedding vectors loaded once per run."""

    def __init__(self, encoders):
        self.encoders = encoders
        self.loaded = {}

    def width(self, encoder):
        """Channels of the encoder's token embeddings (and of its output)."""
        return encoder.transformer.get_input_embeddings().weight.shape[-1]

    def vectors(self, key, tokenizer, encoder, filename):
        """The embedding file's vectors for this encoder, or None if the host cannot load them or they do not fit."""
        if (key, filename) not in self.loaded:
            vectors = None
            if tokenizer.embedding_directory is not None:
                embed = comfy.sd1_clip.load_embed(filename, tokenizer.embedding_directory, tokenizer.embedding_size,
                                                  tokenizer.embedding_key)
                if embed is not None and embed.shape[-1] == self.width(encoder):
                    vectors = [embed] if embed.dim() == 1 else list(embed.reshape(-1, embed.shape[-1]))
            self.loaded[key, filename] = vectors
        return self.loaded[key, filename]

    def usable(self, filename):
        """Whether every encoder of this CLIP can use the embedding file."""
        return all(self.vectors(key, sub, encoder, filename) is not None for key, sub, encoder in self.encoders)

    def vocabulary(self, key, tokenizer, encoder):
        """The Vocabulary of one encoder: the host tokenizer's ids, special tokens and embeddings."""
        def tokenize(text):
            return tokenizer.tokenizer(text, verbose=False)["input_ids"][tokenizer.tokens_start:-1]

        return prompt_tokens.Vocabulary(
            tokenize=tokenize, start=tokenizer.start_token, end=tokenizer.end_token, pad=tokenizer.pad_token,
            comma=tokenizer.tokenizer.get_vocab().get(COMMA_TOKEN_TEXT),
            vectors=lambda filename: self.vectors(key, tokenizer, encoder, filename),
        )


def host_embedding_index(encoders, vocabularies, texts, notes):
    """The embedding files ComfyUI has, minus those this CLIP cannot use (those named in texts are noted)."""
    if encoders is None or any(sub.embedding_directory is None for _, sub, _ in encoders):
        return embeddings.embedding_index(())
    index = embeddings.embedding_index(folder_paths.get_filename_list("embeddings"))
    named = sorted({mention.filename for text in texts for mention in index.find(text)})
    unusable = [filename for filename in named if not vocabularies.usable(filename)]
    for filename in unusable:
        notes.append(f"embedding {filename} does not fit this text encoder (made for another model family): "
                     "its name is encoded as text")
    notes += [f"embedding {filename} used" for filename in named if filename not in unusable]
    return index.without(unusable) if unusable else index


def _a1111_conditioning(clip, encoders, vocabularies, text, index):
    """A1111 emphasis: every chunk encoded unweighted in one pass, then weighted and rescaled per chunk."""
    chunks = {key: prompt_tokens.a1111_token_chunks(text, vocabularies.vocabulary(key, sub, encoder), index)
              for key, sub, encoder in encoders}
    tokens = {key: [[(token, 1.0) for token in chunk.tokens] for chunk in key_chunks]
              for key, key_chunks in chunks.items()}
    # All weights 1.0: the host encodes plainly, without its own empty-prompt interpolation.
    encoded = clip.encode_from_tokens(tokens, return_pooled=True, return_dict=True)
    cond = encoded.pop("cond")
    widths = [(vocabularies.width(encoder), chunks[key]) for key, _, encoder in encoders]
    return [[prompt_tokens.a1111_weighted(cond, widths), encoded]], len(chunks[encoders[0][0]])


EMPTY_NEGATIVE_ZEROED = (
    "empty on SDXL: cross-attention and pooled output are zeros, as A1111 does for an empty negative prompt "
    "(force_zero_negative_prompt; the size embeddings are kept)"
)


def _lpw_conditioning(clip, encoders, vocabularies, texts, index, notes):
    """Diffusers' long-prompt-weighting: both prompts chunked together, each encoded unweighted, then weighted."""
    for label, text in texts.items():
        try:
            attention.parse_attention(text)
        except attention.AttentionSyntaxError as error:
            raise ValueError(f"Astria Encode, {label} prompt: {error}") from error
    sdxl = len(encoders) == 2
    chunker = prompt_tokens.lpw_sdxl_chunks if sdxl else prompt_tokens.lpw_sd1_chunks
    chunks = {key: chunker(texts["positive"], texts["negative"], vocabularies.vocabulary(key, sub, encoder), index)
              for key, sub, encoder in encoders}
    if len({(len(each.positive), each.last_length) for each in chunks.values()}) > 1:
        raise ValueError("Astria Encode: an embedding with a different number of vectors per text encoder gives "
                         "the text encoders different chunks; use weighting a1111 or comfy for this prompt")
    first = chunks[encoders[0][0]]
    conditionings = []
    for number, label in enumerate(texts):
        tokens = {key: [[(token, 1.0) for token in chunk.tokens] for chunk in each[number]]
                  for key, each in chunks.items()}
        encoded = clip.encode_from_tokens(tokens, return_pooled=True, return_dict=True)
        cond = encoded.pop("cond")
        try:
            if sdxl:
                cond = prompt_tokens.lpw_sdxl_weighted(cond, first[number], first.last_length)
                if len(first[number]) > 1:  # diffusers' SDXL pooled output is its last chunk's
                    last = {key: key_tokens[-1:] for key, key_tokens in tokens.items()}
                    encoded["pooled_output"] = clip.encode_from_tokens(last, return_pooled=True)[1]
            else:
                cond = prompt_tokens.lpw_sd1_weighted(cond, first[number])
        except ValueError as error:
            raise ValueError(f"Astria Encode, {label} prompt: {error}") from error
        conditionings.append([[cond, encoded]])
        count = len(first[number])
        notes.append(f"{label}: {count} chunk{'s' if count != 1 else ''} of 75 tokens"
                     + (f", the last one {first.last_length - 2} tokens" if first.last_length < 77 else ""))
        if first.cut[number]:
            notes.append(f"{label}: {first.cut[number]} tokens beyond {75 * prompt_tokens.LPW_MAX_CHUNKS} dropped, "
                         "as diffusers' SD1.x long-prompt-weighting pipeline drops them (max_embeddings_multiples 3)")
        if any(attention.is_chunk_break(*piece) or attention.is_bracketed_break(*piece)
               for piece in attention.parse_attention(texts[label])):
            notes.append(f"{label}: BREAK does not start a chunk in lpw mode: "
                         + ("it is the word BREAK at weight -1, as diffusers' SDXL pipeline encodes it" if sdxl
                            else "it is plain text, as diffusers' SD1.x pipeline reads it"))
    return conditionings


def _zeroed(conditioning):
    """The conditioning with its cross-attention and pooled output made zeros (other entries kept)."""
    [[cond, extra]] = conditioning
    extra = dict(extra)
    if extra.get("pooled_output") is not None:
        extra["pooled_output"] = extra["pooled_output"].new_zeros(extra["pooled_output"].shape)
    return [[cond.new_zeros(cond.shape), extra]]


def _encode_one(clip, encoders, vocabularies, text, weighting, index, label, notes):
    """CONDITIONING of one prompt text in the weighting mode; attention syntax errors name the text."""
    try:
        if weighting == "none":
            converted = attention.comfy_literal(embeddings.with_embedding_prefix(text, index))
        elif weighting == "comfy":
            converted = attention.to_comfy(embeddings.with_embedding_prefix(text, index))
        elif encoders is None:
            converted = attention.comfy_literal(prompt_tokens.unweighted_text(text))
        else:
            conditioning, chunk_count = _a1111_conditioning(clip, encoders, vocabularies, text, index)
            notes.append(f"{label}: {chunk_count} chunk{'s' if chunk_count != 1 else ''} of 75 tokens")
            if any(attention.is_bracketed_break(*piece) for piece in attention.parse_attention(text)):
                notes.append(f"{label}: {attention.BRACKETED_BREAK_WARNING}")
            if label == "negative" and text == "" and len(encoders) == 2:
                notes.append(f"{label}: {EMPTY_NEGATIVE_ZEROED}")
                return _zeroed(conditioning)
            return conditioning
    except attention.AttentionSyntaxError as error:
        error.args = (f"{label} prompt: {error}",)  # which prompt; raised as it is, not wrapped in another error
        raise
    notes += [f"{label}: {warning}" for warning in converted.warnings]
    return encode_text(clip, converted.text)


def encode_prompt(clip, prompt, weighting):
    """(positive, negative, notes) conditioning of a parsed prompt in the given weighting mode."""
    if clip is None:
        raise ValueError("Astria Encode needs a CLIP: connect the checkpoint loader's CLIP output")
    if weighting not in settings.WEIGHTING_MODES:
        raise ValueError(f"weighting {weighting!r} is not one of {', '.join(settings.WEIGHTING_MODES)}")
    texts = {"positive": prompt.positive, "negative": prompt.negative_prompt or ""}
    encoders = clip_encoders(clip)
    notes = [f"weighting {weighting}"]
    if encoders is None and weighting in ("a1111", "lpw"):
        notes.append(f"{type(clip.cond_stage_model).__name__} is not a CLIP-L/CLIP-G text encoder: prompt weights "
                     "have no meaning there, so the text is encoded without them (brackets and weights dropped)")
    if encoders is None:
        notes.append("bare embedding names are looked up only for SD1.x and SDXL text encoders")
    elif weighting in ("a1111", "lpw") and clip.use_clip_schedule and clip.patcher.forced_hooks is not None:
        notes.append(f"scheduled CLIP hooks are not applied in {weighting} mode (use comfy or none for them)")
    vocabularies = _ClipVocabularies(encoders or [])
    index = host_embedding_index(encoders, vocabularies, texts.values(), notes)
    for label, text in texts.items():
        notes += [f"{label}: {warning}" for warning in embeddings.missing_embedding_warnings(text, index)]
    if weighting == "lpw" and encoders is not None:
        positive, negative = _lpw_conditioning(clip, encoders, vocabularies, texts, index, notes)
    else:
        positive, negative = (_encode_one(clip, encoders, vocabularies, text, weighting, index, label, notes)
                              for label, text in texts.items())
    for note in notes[1:]:
        log.info("Astria Encode: %s", note)
    return positive, negative, list(dict.fromkeys(notes))


class AstriaEncode(io.ComfyNode):
    """Encodes the prompt and its negative_prompt as Astria does: attention weights ((word:1.2), [word], 75-token
    chunks) applied as diffusers' long-prompt-weighting pipelines (Astria's use_lpw) apply them, or as A1111 or
    ComfyUI do, and bare textual-inversion names found in ComfyUI's embeddings folder. use_lpw=false encodes
    brackets as plain text."""

    @classmethod
    def define_schema(cls):
        return node_schema(
            cls, "AstriaEncode", "Astria Encode",
            inputs=[
                io.Clip.Input("clip", tooltip="The text encoder (SD1.x or SDXL get prompt weighting; others the "
                                              "plain text)."),
                AstriaPromptType.Input("astria_prompt", tooltip="The parsed prompt from Astria Prompt."),
                io.Combo.Input("weighting", options=WEIGHTING_CHOICES, default=FROM_PROMPT,
                               tooltip="from prompt: lpw unless the prompt says use_lpw=false (then none). "
                                       "lpw: diffusers' long-prompt-weighting pipelines, which Astria's use_lpw "
                                       "runs (SD1.x: mean restored, at most 225 tokens; SDXL: interpolation "
                                       "toward each chunk's end token). a1111: A1111's emphasis and chunking "
                                       "(comma backtrack, BREAK). comfy: ComfyUI's own formula for the same "
                                       "weights. none: brackets are plain text, every weight 1.0."),
            ],
            outputs=[
                io.Conditioning.Output(display_name="positive", tooltip="The prompt's text, weighted as chosen."),
                io.Conditioning.Output(display_name="negative",
                                       tooltip="The negative_prompt, weighted as chosen (empty text when unset)."),
                io.String.Output(display_name="notes",
                                 tooltip="How it was encoded: the weighting used, chunks, embeddings found or not."),
            ],
        )

    @classmethod
    def execute(cls, clip, astria_prompt, weighting) -> io.NodeOutput:
        positive, negative, notes = encode_prompt(clip, astria_prompt, weighting_for(astria_prompt, weighting))
        return io.NodeOutput(positive, negative, "\n".join(notes))


ENCODE_NODES: list[type[io.ComfyNode]] = [AstriaEncode]
__all__ = ["ENCODE_NODES", "AstriaEncode", "encode_prompt", "weighting_for"]
