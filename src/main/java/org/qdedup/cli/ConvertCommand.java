package org.qdedup.cli;

import java.io.PrintStream;

import java.nio.file.Files;
import java.nio.file.Path;
import java.util.concurrent.Callable;
import org.qdedup.image.BlockDevice;
import org.qdedup.image.Images;
import org.qdedup.image.OpenOptions;
import org.qdedup.io.FileBlockFile;
import org.qdedup.ops.Progress;
import java.util.Map;
import org.qdedup.image.CreateOptions;
import org.qdedup.image.Qcow2Create;
import org.qdedup.image.Qcow2Image;
import org.qdedup.ops.Converter;
import picocli.CommandLine.Command;
import picocli.CommandLine.Option;
import picocli.CommandLine.Parameters;

@Command(name = "convert", description = "Copy an image into a new one (as qemu-img convert).")
final class ConvertCommand implements Callable<Integer> {
    @Option(names = "-f", paramLabel = "FMT", description = "Source format; probed when omitted.")
    String format;
    @Option(names = "-O", paramLabel = "FMT", defaultValue = "raw", description = "Output format: raw (default) or qcow2.")
    String outFormat;
    @Option(names = "-o", paramLabel = "OPTS", description = "Output format options (qcow2).")
    String options;
    @Option(names = "-c", description = "Compress the output (qcow2).")
    boolean compress;
    @Option(names = "-p", description = "Show progress on stderr.")
    boolean progress;
    @Option(names = "-n", description = "Write into an existing target instead of creating it.")
    boolean noCreate;
    @Option(names = "-t", paramLabel = "CACHE", description = "Target cache mode: unsafe (default, no final flush), "
            + "writeback, writethrough, none, directsync.")
    String cache = "unsafe";

    /** With a final flush, write-back starts after every this many bytes, so the disk works during the copy. */
    private static final long WRITE_BEHIND = 32L << 20;
    @Option(names = "-l", paramLabel = "snapshot.name=NAME", description = "Convert an internal snapshot of the source.")
    String snapshot;
    @Option(names = {"-U", "--force-share"}, description = "Open the source without taking its lock.")
    boolean forceShare;
    @Option(names = "--dedup", description = "Deduplicate the output (qcow2).")
    boolean dedup;
    @Parameters(index = "0", paramLabel = "SRC")
    String src;
    @Parameters(index = "1", paramLabel = "DST")
    String dst;

    private void toRaw(BlockDevice source, Path dp, Progress p) throws Exception {
        try (FileBlockFile target = FileBlockFile.open(dst, dp, true, FileBlockFile.Lock.EXCLUSIVE, !noCreate)) {
            if (noCreate) {
                if (target.size() < source.size()) {
                    throw new CliException(dst + ": target is smaller (" + target.size() + " bytes) than the source ("
                            + source.size() + " bytes)");
                }
            } else {
                target.truncate(source.size());
            }
            if (!cache.equals("unsafe")) {
                target.writeBehind(WRITE_BEHIND);
            }
            if (bypassesHostCache()) {
                target.directWritesWhenLarge();
            }
            Converter.copy(source, Converter.raw(target), !noCreate, p);
            if (!cache.equals("unsafe")) {
                target.flush();
            }
        }
    }

    private void toQcow2(BlockDevice source, Map<String, String> opts, Progress p) throws Exception {
        if (!noCreate) {
            ImageOptions.Applied a = ImageOptions.apply(opts, CreateOptions.defaults(source.size()));
            boolean wantDedup = dedup || Boolean.TRUE.equals(a.dedup());
            CreateOptions co = a.create();
            if (wantDedup && !opts.containsKey("cluster_size")) {
                co = co.withClusterBits(12);
            }
            a = new ImageOptions.Applied(co, a.preallocation(), wantDedup, a.dedupHeadroom());
            ImageOptions.checkHeadroom(a, wantDedup);
            if (!a.preallocation().equals("off")) {
                throw new CliException("preallocation=" + a.preallocation() + " is not supported yet (only off)");
            }
            if (a.create().backingFile() != null) {
                throw new CliException("backing_file with convert is not supported yet");
            }
            Qcow2Create.create(dst, a.create().withSize(source.size()));
            if (Boolean.TRUE.equals(a.dedup())) {
                ImageOptions.enableDedup(dst, co, a.dedupHeadroom());
            }
        } else if (dedup) {
            org.qdedup.image.ImageOps.enableDedup(dst);
        }
        try (Qcow2Image target = Images.openWritable(dst, OpenOptions.defaults().withFormat("qcow2"))) {
            if (target.size() < source.size()) {
                throw new CliException(dst + ": target is smaller (" + target.size() + " bytes) than the source ("
                        + source.size() + " bytes)");
            }
            for (var f : new org.qdedup.io.BlockFile[]{target.file(), target.dataFile()}) {
                if (f instanceof FileBlockFile ff) {
                    if (cache.equals("unsafe")) {
                        ff.disableSync(true);
                    } else {
                        ff.writeBehind(WRITE_BEHIND);
                    }
                    if (bypassesHostCache()) {
                        ff.directWritesWhenLarge();
                    }
                }
            }
            if (progress && target.writer() != null) {
                PrintStream perr = Context.err();
                long[] last = {-1};
                target.writer().onDedupRebuildProgress(bytes -> {
                    long mib = bytes >> 20;
                    synchronized (last) {
                        if (mib / 256 != last[0]) {
                            last[0] = mib / 256;
                            perr.printf("    rebuilding the dedup index of %s: %d MiB read\r", dst, mib);
                        }
                    }
                });
            }
            Converter.copy(source, compress ? Converter.compressed(target) : Converter.image(target),
                    !noCreate && target.backing() == null, p);
        }
    }

    /**
     * -t none and directsync: bulk data goes to the disk with O_DIRECT, as QEMU opens such targets (metadata stays
     * buffered and is flushed at the end). Measured here, direct writes make writeback converts slower: they block
     * the copying threads, where buffered writes and write-behind let the disk work while they read.
     */
    private boolean bypassesHostCache() {
        return cache.equals("none") || cache.equals("directsync");
    }

    /** Every file of the source chain reads its uncached bulk around the page cache: convert reads it only once. */
    private static void directReadsWhenUncached(BlockDevice source) throws java.io.IOException {
        for (BlockDevice d = source; d != null; d = d.backing()) {
            if (d.file() instanceof FileBlockFile f) {
                f.directReadsWhenUncached();
            }
            if (d instanceof Qcow2Image q && q.dataFile() instanceof FileBlockFile f) {
                f.directReadsWhenUncached();
            }
        }
    }

    @Override
    public Integer call() throws Exception {
        if (noCreate && options != null) {
            throw new CliException("-o cannot be used with -n: the target exists and keeps its options");
        }
        String snapName = null;
        if (snapshot != null) {
            if (snapshot.startsWith("snapshot.name=")) {
                snapName = snapshot.substring("snapshot.name=".length());
            } else if (snapshot.startsWith("snapshot.id=") || snapshot.contains("=")) {
                throw new CliException("-l supports snapshot.name=NAME only, not '" + snapshot + "'");
            } else {
                snapName = snapshot;
            }
        }
        switch (cache) {
            case "unsafe", "writeback", "writethrough", "none", "directsync" -> { }
            default -> throw new CliException("invalid cache mode '" + cache + "'");
        }
        if (!outFormat.equals("raw") && !outFormat.equals("qcow2")) {
            throw new CliException("unknown output format '" + outFormat + "' (expected raw or qcow2)");
        }
        if (compress && outFormat.equals("raw")) {
            throw new CliException("-c: compression is not supported for the raw output format");
        }
        Map<String, String> opts = ImageOptions.parse(options);
        if (dedup && compress) {
            throw new CliException("--dedup and -c cannot be combined (compressed clusters are not shared)");
        }
        if (outFormat.equals("raw") && (!opts.isEmpty() || dedup)) {
            throw new CliException("-o and --dedup need -O qcow2");
        }
        try (BlockDevice source = Images.open(src, new OpenOptions(format, forceShare, snapName))) {
            Path dp = Path.of(dst);
            if (Files.exists(dp) && Files.isSameFile(dp, Path.of(src))) {
                throw new CliException(dst + ": target is the source image");
            }
            directReadsWhenUncached(source);
            Progress p = progress ? new Progress(Context.err(), source.size()) : Progress.none();
            if (outFormat.equals("raw")) {
                toRaw(source, dp, p);
            } else {
                toQcow2(source, opts, p);
            }
            if (progress) {
                p.finish();
            }
        }
        return 0;
    }
}
