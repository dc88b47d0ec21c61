package org.qdedup.cli;

import java.io.PrintStream;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.concurrent.Callable;
import org.qdedup.image.BlockDevice;
import org.qdedup.image.Images;
import org.qdedup.image.OpenOptions;
import org.qdedup.ops.Estimate;
import org.qdedup.ops.Progress;
import picocli.CommandLine.Command;
import picocli.CommandLine.Option;
import picocli.CommandLine.Parameters;

@Command(name = "estimate", description = "Estimate what dedup would save on an image at several cluster sizes; "
        + "writes nothing. Reads every cluster once and counts distinct contents (SHA-256); the saving counts one "
        + "stored cluster per distinct content, plus the extra copies 16-bit refcounts with one snapshot of headroom "
        + "need for contents used more than 32767 times.")
final class EstimateCommand implements Callable<Integer> {
    @Option(names = "-f", paramLabel = "FMT", description = "Image format (raw or qcow2); probed when omitted.")
    String format;
    @Option(names = "--cluster-size", paramLabel = "SIZES", defaultValue = "4k,16k,64k",
            description = "Comma-separated cluster sizes (default 4k,16k,64k).")
    String clusterSizes;
    @Option(names = {"-U", "--force-share"}, description = "Open without taking the image lock.")
    boolean forceShare;
    @Option(names = "-p", description = "Show progress on stderr.")
    boolean progress;
    @Option(names = "--output", paramLabel = "FMT", defaultValue = "human", description = "human or json.")
    String output;
    @Parameters(paramLabel = "IMG")
    String image;

    /** References one stored cluster may serve: 16-bit refcounts with one snapshot of headroom, as convert makes. */
    static final long REFERENCES_PER_CLUSTER = 65535 / 2;

    @Override
    public Integer call() throws Exception {
        boolean json = OutputFormat.json(output);
        List<Long> sizes = new ArrayList<>();
        for (String s : clusterSizes.split(",")) {
            long cs;
            try {
                cs = Sizes.parse(s.trim());
            } catch (IllegalArgumentException e) {
                throw new CliException("--cluster-size: '" + s.trim() + "' is not a size");
            }
            if (cs < 512 || cs > (2 << 20) || Long.bitCount(cs) != 1) {
                throw new CliException("--cluster-size: " + s.trim() + " is not a power of two from 512 to 2M");
            }
            sizes.add(cs);
        }
        try (BlockDevice dev = Images.open(image, new OpenOptions(format, forceShare, null))) {
            Progress p = progress ? new Progress(Context.err(), dev.size()) : Progress.none();
            List<Estimate.Result> rs = Estimate.run(dev, sizes.stream().mapToLong(Long::longValue).toArray(),
                    REFERENCES_PER_CLUSTER, p);
            p.finish();
            PrintStream out = Context.out();
            if (json) {
                List<Object> arr = new ArrayList<>();
                for (Estimate.Result r : rs) {
                    Map<String, Object> m = new LinkedHashMap<>();
                    m.put("cluster-size", r.clusterSize());
                    m.put("data-clusters", r.dataClusters());
                    m.put("distinct-clusters", r.distinctClusters());
                    m.put("zero-clusters", r.zeroClusters());
                    m.put("saved-bytes", r.savedBytes());
                    m.put("dedup-ratio", Math.round(r.dedupRatio() * 1000) / 1000.0);
                    arr.add(m);
                }
                out.println(Json.pretty(arr));
                return 0;
            }
            out.printf("%-12s %14s %14s %14s %16s %7s%n", "cluster size", "data clusters", "distinct", "zero clusters",
                    "saved bytes", "ratio");
            for (Estimate.Result r : rs) {
                out.printf("%-12d %14d %14d %14d %16d %7.2f%n", r.clusterSize(), r.dataClusters(), r.distinctClusters(),
                        r.zeroClusters(), r.savedBytes(), r.dedupRatio());
            }
            return 0;
        }
    }
}
