"""`wsl dedup`: drop pretraining samples that copy an evaluation image, and exact byte duplicates.

The copies on the web are resized, re-compressed, cropped, recoloured and mirrored versions
of the evaluation images. The descriptor is pixels, at low resolution, in two stages:

1. Retrieval. Every evaluation image is indexed as many windows: crops keeping at least
   `min_area` of it (each side >= `min_side`, on a grid of `window_step`), centred windows
   (80-95% of each side) of it rotated by 5 and 10 degrees both ways (`max_rotation`: a copy
   rotated with its corners cropped away is such a window, which no upright crop resembles at
   16 x 16), and their mirror images, each a COARSE x COARSE luminance thumbnail measured from
   its median in units of its median absolute deviation (so brightness, contrast, colour
   filters and grayscale barely move it), clipped at 2.5 of them (so a few cells far from the
   rest, stickers or text on a dark scene, weigh no more than a strong edge), L2-normalised,
   searched exactly (or, for large sets, through a FAISS IVF index, whose hits are re-ranked by
   their exact similarity unless a bound puts them all below the prefilter). A pretraining image is
   one thumbnail of its whole frame, decoded in JPEG draft mode (the decoder scales by
   1/2..1/8 for free). One of the windows is within half a grid step of any crop, so the right
   evaluation image is among the nearest. The 10 nearest images are ordered by the mean of
   that similarity and of the similarity over the 90% of cells that agree best (stickers or a
   band move a few cells far, which can rank another image first). A view below the prefilter
   is verified still where one of those images, at its nearest window or its whole one, reaches
   `overlay_prefilter` over those cells (stickers can pull a copy below the prefilter, and
   another alike scene nearest); verification takes the
   first `candidates`, each from the one of its 10 nearest windows nearest by the unclipped
   cells (clipping flattens a bright object too, and the ascent can stop on a local best from a
   window a grid step off). An image whose photo may sit
   inside a plain frame, letterbox or screenshot bars (rows and columns that are digitally
   flat, or carry a line of text on a flat colour), above a caption band, or on a story's
   blurred background (smooth rows, or a symmetric pair of straight edges with quieter rows
   outside them) is also searched as that photo alone: there the original is inside the copy,
   not the copy inside the original. The borders are taken from the image's edges inward.
2. Verification. For each of the `candidates` nearest evaluation images, the window is refined
   by coordinate ascent (edges, position, size): first on the whole FINE x FINE thumbnail,
   which lines up the objects, then on its detail (what the thumbnail holds beyond 4 x 4-pixel
   block averages: texture, edges), which lines up the texture. Where the detail stays below
   the threshold of a candidate that lines up, it is also scored over the blocks whose mean
   colours agree, less `overlay_penalty` (stickers, text or a caption band change the colours
   of the blocks they cover; a copy's other blocks keep the original's detail). Where the
   overlay pulled the whole alignment off (bright stickers on a dark scene), the blocks under the
   coarse cells farthest from the candidate's (unclipped: clipping caps an overlay's cells, the
   ones to find) are left out, and both ascents run again over the
   rest, less `realigned_penalty`: the overlay is in the copy's frame, so those blocks stay put
   as the window moves. That starts from the nearest window or the image's whole one, whichever
   is nearer over the cells that agree best (stickers over a whole photo can pull the nearest
   onto a crop). Where the verified images are not the copy's original, the next shortlisted
   one is lined up that way alone where it is near over those cells and correlates at
   NEXT_GATE at its start: stickers can rank another alike scene first. A window may
   shrink to half of each side, but one under 90% of `min_area` pays `small_window_penalty`:
   a crop of another photo of the same scene (a stereo twin) lines up there. A rotated
   window is lined up on the evaluation image rotated alike, in the copy's aspect, and where
   that fails, upright from the same window (a vignette can favour a rotated window). The
   score is the correlation of the details (of the luminance when the pretraining image is
   grayscale); a sample is a copy when it reaches `threshold`. Whole thumbnails of two
   different images with a similar object on a similar background can correlate above 0.95
   once aligned; their details do not, while a copy's survive JPEG quality 30 and a 2x
   downscale.

`descriptor=sscd:PATH` uses a learned copy-detection embedding instead (SSCD, `wsl.dedup.sscd`;
DINOv2's data curation de-duplicates with it): trained for the edits the pixels still miss
(rotations between and past the indexed ones, overlays that hide a simple scene), fast on a
GPU, but its weights must be fetched by the user: nothing here downloads them. Pixels need
none. Recall per edit, false removals and costs: BENCHMARKS.md (`make bench-dedup`).

Input shards are processed in parallel, one task a shard, each writing its decisions
(`decisions/<shard>.json`) through a rename; byte duplicates are then resolved in shard
order (the first copy stays); the filtered shards are written through a rename too. A killed
run re-run skips every finished decision and shard, and the same input gives byte-identical
output.
"""
