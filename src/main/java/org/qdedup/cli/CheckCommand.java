package org.qdedup.cli;

import java.io.PrintStream;
import java.nio.file.Path;
import java.util.LinkedHashMap;
import java.util.Map;
import java.util.concurrent.Callable;
import org.qdedup.image.Check;
import org.qdedup.image.Images;
import org.qdedup.io.FileBlockFile;
import picocli.CommandLine.Command;
import picocli.CommandLine.Option;
import picocli.CommandLine.Parameters;

@Command(name = "check", description = "Check (and with -r repair) a qcow2 image's metadata, as qemu-img check. "
        + "Exit 0 clean, 1 check error, 2 corruptions, 3 leaks only, 63 no checks for this format.")
final class CheckCommand implements Callable<Integer> {
    @Option(names = "-f", paramLabel = "FMT", description = "Image format; probed when omitted.")
    String format;
    @Option(names = "-r", paramLabel = "leaks|all", description = "Repair leaked clusters, or everything.")
    String repair;
    @Option(names = "--output", paramLabel = "FMT", defaultValue = "human", description = "human or json.")
    String output;
    @Option(names = {"-U", "--force-share"}, description = "Open without taking the image lock (not with -r).")
    boolean forceShare;
    @Option(names = "-q", description = "Quiet.")
    boolean quiet;
    @Parameters(paramLabel = "IMG")
    String image;

    @Override
    public Integer call() throws Exception {
        boolean json = OutputFormat.json(output);
        Check.Fix fix = repair == null ? Check.Fix.NONE : switch (repair) {
            case "leaks" -> Check.Fix.LEAKS;
            case "all" -> Check.Fix.ALL;
            default -> throw new CliException("-r must be 'leaks' or 'all', not '" + repair + "'");
        };
        if (fix != Check.Fix.NONE && forceShare) {
            throw new CliException("-U cannot be used with -r: repairing needs the image lock");
        }
        PrintStream out = Context.out();
        PrintStream err = Context.err();
        boolean rw = fix != Check.Fix.NONE;
        try (FileBlockFile f = FileBlockFile.open(image, Path.of(image), rw,
                rw ? FileBlockFile.Lock.EXCLUSIVE : forceShare ? FileBlockFile.Lock.NONE : FileBlockFile.Lock.SHARED)) {
            String fmt = format != null ? format : Images.looksLikeQcow2(f) ? "qcow2" : "raw";
            if (fmt.equals("raw")) {
                err.println("qdedup: This image format does not support checks");
                return 63;
            }
            if (!fmt.equals("qcow2")) {
                throw new CliException("unknown format '" + fmt + "'");
            }
            Check.Result r;
            try {
                r = Check.run(f, fix, err);
            } catch (java.io.IOException e) {
                if (e instanceof org.qdedup.format.FormatException) {
                    throw e;
                }
                err.println("qdedup: " + image + ": Check failed: " + e.getMessage());
                return 1;
            }
            if (!json && !quiet && (r.corruptionsFixed > 0 || r.leaksFixed > 0)) {
                out.printf("The following inconsistencies were found and repaired:%n%n    %d leaked clusters%n    %d corruptions%n%n"
                        + "Double checking the fixed image now...%n", r.leaksFixed, r.corruptionsFixed);
            }
            org.qdedup.format.Header h = Images.readHeader(f, true);
            org.qdedup.image.DedupIndexFile.Found idx = h.dedup() ? org.qdedup.image.DedupIndexFile.find(f, h) : null;
            if (json) {
                Map<String, Object> m = json(r);
                if (idx != null) {
                    m.put("dedup-index", idx.state());
                    if (idx.inSync()) {
                        m.put("dedup-index-entries", (long) idx.contents().clusters().length);
                    }
                }
                out.println(Json.pretty(m));
            } else if (!quiet) {
                human(out, r);
                if (idx != null) {
                    out.println(idx.inSync()
                            ? "Dedup index: in sync with the image (" + idx.contents().clusters().length + " entries in "
                                    + idx.path().getFileName() + ")"
                            : "Dedup index: rebuilt from the image at the next read-write open (" + idx.problem() + ")");
                }
            }
            if (r.checkErrors > 0) {
                err.println("qdedup: " + image + ": Check failed");
                return 1;
            }
            return r.corruptions > 0 ? 2 : r.leaks > 0 ? 3 : 0;
        }
    }

    private Map<String, Object> json(Check.Result r) {
        Map<String, Object> m = new LinkedHashMap<>();
        if (r.imageEndOffset != 0) {
            m.put("image-end-offset", r.imageEndOffset);
        }
        if (r.totalClusters != 0) {
            m.put("total-clusters", r.totalClusters);
        }
        m.put("check-errors", r.checkErrors);
        if (r.leaks != 0) {
            m.put("leaks", r.leaks);
        }
        if (r.corruptions != 0) {
            m.put("corruptions", r.corruptions);
        }
        if (r.allocatedClusters != 0) {
            m.put("allocated-clusters", r.allocatedClusters);
        }
        m.put("filename", image);
        m.put("format", "qcow2");
        if (r.fragmentedClusters != 0) {
            m.put("fragmented-clusters", r.fragmentedClusters);
        }
        if (r.compressedClusters != 0) {
            m.put("compressed-clusters", r.compressedClusters);
        }
        if (r.leaksFixed != 0) {
            m.put("leaks-fixed", r.leaksFixed);
        }
        if (r.corruptionsFixed != 0) {
            m.put("corruptions-fixed", r.corruptionsFixed);
        }
        return m;
    }

    /** qemu-img's dump_human_image_check. */
    private static void human(PrintStream out, Check.Result r) {
        if (r.corruptions == 0 && r.leaks == 0 && r.checkErrors == 0) {
            out.println("No errors were found on the image.");
        } else {
            if (r.corruptions != 0) {
                out.printf("%n%d errors were found on the image.%nData may be corrupted, or further writes to the image may corrupt it.%n",
                        r.corruptions);
            }
            if (r.leaks != 0) {
                out.printf("%n%d leaked clusters were found on the image.%nThis means waste of disk space, but no harm to data.%n",
                        r.leaks);
            }
            if (r.checkErrors != 0) {
                out.printf("%n%d internal errors have occurred during the check.%n", r.checkErrors);
            }
        }
        if (r.totalClusters != 0 && r.allocatedClusters != 0) {
            out.printf("%d/%d = %.2f%% allocated, %.2f%% fragmented, %.2f%% compressed clusters%n", r.allocatedClusters,
                    r.totalClusters, r.allocatedClusters * 100.0 / r.totalClusters,
                    r.fragmentedClusters * 100.0 / r.allocatedClusters, r.compressedClusters * 100.0 / r.allocatedClusters);
        }
        if (r.imageEndOffset != 0) {
            out.println("Image end offset: " + r.imageEndOffset);
        }
    }
}
