package org.qdedup.cli;

import java.io.PrintStream;
import java.util.LinkedHashMap;
import java.util.Map;
import java.util.concurrent.Callable;
import org.qdedup.image.BlockDevice;
import org.qdedup.image.DedupStats;
import org.qdedup.image.Images;
import org.qdedup.image.OpenOptions;
import org.qdedup.image.Qcow2Image;
import picocli.CommandLine.Command;
import picocli.CommandLine.Option;
import picocli.CommandLine.Parameters;

@Command(name = "stats", description = "Show the dedup state of a qcow2 image: data clusters, sharing, savings, index.")
final class StatsCommand implements Callable<Integer> {
    @Option(names = {"-U", "--force-share"}, description = "Open without taking the image lock.")
    boolean forceShare;
    @Option(names = "--output", paramLabel = "FMT", defaultValue = "human", description = "human or json.")
    String output;
    @Parameters(paramLabel = "IMG")
    String image;

    /** The JSON keys of CLI.md's stats (serve --metrics starts with the same). */
    static Map<String, Object> json(DedupStats s) {
        Map<String, Object> m = new LinkedHashMap<>();
        m.put("virtual-size", s.virtualSize());
        m.put("cluster-size", s.clusterSize());
        m.put("dedup", s.dedup());
        m.put("data-clusters", s.dataClusters());
        m.put("referenced-clusters", s.referencedClusters());
        m.put("zero-clusters", s.zeroClusters());
        m.put("shared-clusters", s.sharedClusters());
        m.put("saved-bytes", s.savedBytes());
        m.put("dedup-ratio", Math.round(s.dedupRatio() * 1000) / 1000.0);
        m.put("index-entries", s.indexEntries());
        m.put("index-bytes", s.indexBytes());
        m.put("index-state", s.indexState());
        return m;
    }

    @Override
    public Integer call() throws Exception {
        boolean json = OutputFormat.json(output);
        try (BlockDevice dev = Images.open(image, new OpenOptions("qcow2", forceShare, null))) {
            if (!(dev instanceof Qcow2Image q)) {
                throw new CliException(image + ": stats needs a qcow2 image");
            }
            DedupStats s = DedupStats.of(q);
            Map<String, Object> m = json(s);
            PrintStream out = Context.out();
            if (json) {
                out.println(Json.pretty(m));
                return 0;
            }
            out.println("image: " + image);
            out.println("virtual size: " + s.virtualSize() + " bytes, cluster size " + s.clusterSize());
            out.println("dedup: " + (s.dedup() ? "on" : "off"));
            out.printf("data clusters: %d (%d bytes)%n", s.dataClusters(), s.dataClusters() * s.clusterSize());
            out.println("referenced clusters: " + s.referencedClusters());
            out.println("zero clusters: " + s.zeroClusters());
            out.println("shared clusters: " + s.sharedClusters());
            out.printf("saved: %d bytes, dedup ratio %.2f%n", s.savedBytes(), s.dedupRatio());
            if (s.dedup()) {
                out.printf("dedup index: %s, %d entries, %d bytes of RAM%n", s.indexState(), s.indexEntries(), s.indexBytes());
            }
            return 0;
        }
    }
}
