package org.qdedup.cli;

import java.io.PrintStream;
import java.nio.file.Path;
import java.util.Map;
import java.util.concurrent.Callable;
import org.qdedup.image.BlockDevice;
import org.qdedup.image.CreateOptions;
import org.qdedup.image.Images;
import org.qdedup.image.OpenOptions;
import org.qdedup.image.Qcow2Create;
import org.qdedup.io.FileBlockFile;
import picocli.CommandLine.Command;
import picocli.CommandLine.Option;
import picocli.CommandLine.Parameters;

@Command(name = "create", description = "Create a new image (qcow2 unless -f raw).")
final class CreateCommand implements Callable<Integer> {
    @Option(names = "-f", paramLabel = "FMT", defaultValue = "qcow2", description = "qcow2 (default) or raw.")
    String format;
    @Option(names = "-o", paramLabel = "OPTS", description = "cluster_size, compat, refcount_bits, extended_l2, "
            + "lazy_refcounts, compression_type, preallocation, backing_file, backing_fmt, data_file, data_file_raw, dedup, dedup_headroom (snapshots that must still fit after sharing, default 1).")
    String options;
    @Option(names = "-b", paramLabel = "BACKING", description = "Backing file (relative to the new image's directory).")
    String backing;
    @Option(names = "-F", paramLabel = "FMT", description = "Backing file format (required with -b).")
    String backingFormat;
    @Option(names = "-u", description = "Do not open the backing file (SIZE is then required).")
    boolean unsafe;
    @Option(names = "-q", description = "Quiet: no 'Formatting' line.")
    boolean quiet;
    @Option(names = "--dedup", description = "Enable deduplication (4 KiB clusters unless -o cluster_size).")
    boolean dedup;
    @Parameters(index = "0", paramLabel = "IMG")
    String image;
    @Parameters(index = "1", paramLabel = "SIZE", arity = "0..1")
    String sizeArg;

    @Override
    public Integer call() throws Exception {
        Map<String, String> opts = ImageOptions.parse(options);
        long size = -1;
        if (sizeArg != null) {
            try {
                size = Sizes.parse(sizeArg);
            } catch (IllegalArgumentException e) {
                throw new CliException("Invalid image size specified: " + e.getMessage());
            }
        }
        if (format.equals("raw")) {
            if (!opts.isEmpty() || backing != null || dedup) {
                throw new CliException("raw images take no -o options, backing file or dedup");
            }
            if (size < 0) {
                throw new CliException("Image creation needs a size parameter");
            }
            try (FileBlockFile f = FileBlockFile.open(image, Path.of(image), true, FileBlockFile.Lock.EXCLUSIVE, true)) {
                f.truncate(size);
            }
            formatting("raw", "size=" + size);
            return 0;
        }
        if (!format.equals("qcow2")) {
            throw new CliException("unknown format '" + format + "' (expected qcow2 or raw)");
        }
        ImageOptions.Applied a = ImageOptions.apply(opts, CreateOptions.defaults(Math.max(size, 0)));
        CreateOptions o = a.create();
        if (backing != null) {
            o = o.withBacking(backing, backingFormat != null ? backingFormat : o.backingFormat());
        } else if (backingFormat != null && o.backingFile() == null) {
            throw new CliException("-F needs a backing file (-b)");
        }
        boolean wantDedup = dedup || Boolean.TRUE.equals(a.dedup());
        if (wantDedup && !opts.containsKey("cluster_size")) {
            o = o.withClusterBits(12); // dedup works per cluster: 4 KiB matches guest file system blocks
        }
        if (wantDedup && o.dataFile() != null) {
            throw new CliException(image + ": dedup needs shareable clusters: images with data_file cannot share them");
        }
        ImageOptions.checkHeadroom(a, wantDedup);
        if (o.backingFile() != null) {
            if (o.backingFormat() == null) {
                throw new CliException(image + ": Backing file specified without backing format (use -F raw or -F qcow2)");
            }
            if (!unsafe) {
                String resolved = Images.combine(image, o.backingFile());
                try (BlockDevice b = Images.open(resolved, new OpenOptions(o.backingFormat(), true, null))) {
                    if (size < 0) {
                        o = o.withSize(b.size());
                    }
                }
            }
        }
        if (size < 0 && o.backingFile() == null) {
            throw new CliException("Image creation needs a size parameter");
        }
        if (size < 0 && o.backingFile() != null && unsafe) {
            throw new CliException("Image creation needs a size parameter with -u");
        }
        if (!a.preallocation().equals("off")) {
            throw new CliException("preallocation=" + a.preallocation() + " is not supported yet (only off)");
        }
        if (o.clusterBits() == 12 && o.size() > (8L << 40)) {
            throw new CliException(image + ": with 4 KiB clusters a qcow2 image holds at most 8 TiB (QEMU's 32 MiB L1 cap)");
        }
        Qcow2Create.create(image, o);
        if (wantDedup) {
            ImageOptions.enableDedup(image, o, a.dedupHeadroom());
        }
        formatting("qcow2", qcow2Summary(o) + (wantDedup ? " dedup=on" : ""));
        return 0;
    }

    private void formatting(String fmt, String rest) {
        if (!quiet) {
            PrintStream out = Context.out();
            out.println("Formatting '" + image + "', fmt=" + fmt + " " + rest);
        }
    }

    private static String qcow2Summary(CreateOptions o) {
        StringBuilder sb = new StringBuilder();
        sb.append("cluster_size=").append(1L << o.clusterBits());
        if (o.version() == 2) {
            sb.append(" compat=0.10");
        }
        sb.append(" extended_l2=").append(o.extendedL2() ? "on" : "off");
        sb.append(" compression_type=").append(o.compressionType() == 1 ? "zstd" : "zlib");
        sb.append(" size=").append(o.size());
        if (o.backingFile() != null) {
            sb.append(" backing_file=").append(o.backingFile()).append(" backing_fmt=").append(o.backingFormat());
        }
        if (o.dataFile() != null) {
            sb.append(" data_file=").append(o.dataFile()).append(" data_file_raw=").append(o.dataFileRaw() ? "on" : "off");
        }
        sb.append(" lazy_refcounts=").append(o.lazyRefcounts() ? "on" : "off");
        sb.append(" refcount_bits=").append(1 << o.refcountOrder());
        return sb.toString();
    }
}
