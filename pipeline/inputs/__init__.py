"""The user's files, up to pixels: the lowest layer of the flow.

- scan: finding images under folders (loop-safe), manifest and label CSVs;
- decode: checked, bounded decoding of a file into the model's pixels;
- groundtruth: reading an instance benchmark's query,relevant CSV;
- thumbs: the one thumbnail maker (web page and report);
- dates: when a photo was taken (its EXIF date), from an opened image or a header.

May import only the bottom modules (errors, files, config, specs, faults,
raycluster); never embed, store or anything above, so a bad file is refused
before any model or catalog is touched. The front-ends (cli, web) may use it.
"""
