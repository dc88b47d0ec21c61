package org.qdedup.cli;

import java.io.PrintStream;
import java.time.Instant;
import java.time.ZoneId;
import java.time.format.DateTimeFormatter;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.concurrent.Callable;
import org.qdedup.format.Header;
import org.qdedup.format.Snapshot;
import org.qdedup.image.BlockDevice;
import org.qdedup.image.Images;
import org.qdedup.image.OpenOptions;
import org.qdedup.image.Qcow2Image;
import picocli.CommandLine.Command;
import picocli.CommandLine.Option;
import picocli.CommandLine.Parameters;

@Command(name = "info", description = "Show an image's format, sizes, backing file and snapshots (as qemu-img info).")
final class InfoCommand implements Callable<Integer> {
    @Option(names = "-f", paramLabel = "FMT", description = "Image format (raw or qcow2); probed when omitted.")
    String format;
    @Option(names = {"-U", "--force-share"}, description = "Open without taking the image lock.")
    boolean forceShare;
    @Option(names = "--output", paramLabel = "FMT", defaultValue = "human", description = "human or json.")
    String output;
    @Option(names = "--backing-chain", description = "Show every image of the backing chain.")
    boolean backingChain;
    @Parameters(paramLabel = "IMG")
    String image;

    @Override
    public Integer call() throws Exception {
        boolean json = OutputFormat.json(output);
        PrintStream out = Context.out();
        try (BlockDevice dev = Images.open(image, new OpenOptions(format, forceShare, null))) {
            List<BlockDevice> chain = backingChain ? Images.chain(dev) : List.of(dev);
            if (json) {
                List<Object> infos = new ArrayList<>();
                for (BlockDevice d : chain) {
                    infos.add(info(d));
                }
                out.println(Json.pretty(backingChain ? infos : infos.get(0)));
            } else {
                for (int i = 0; i < chain.size(); i++) {
                    if (i > 0) {
                        out.println();
                    }
                    human(out, chain.get(i));
                }
            }
        }
        return 0;
    }

    /** The keys qemu-img info --output=json prints. */
    static Map<String, Object> info(BlockDevice d) throws java.io.IOException {
        Map<String, Object> m = new LinkedHashMap<>();
        if (d instanceof Qcow2Image q) {
            Header h = q.header();
            if (h.backingFile() != null && h.backingFormat() != null) {
                m.put("backing-filename-format", h.backingFormat());
            }
            if (!q.snapshots().isEmpty()) {
                List<Object> snaps = new ArrayList<>();
                for (Snapshot s : q.snapshots()) {
                    Map<String, Object> sm = new LinkedHashMap<>();
                    if (s.icount() >= 0) {
                        sm.put("icount", s.icount());
                    }
                    sm.put("vm-clock-nsec", s.vmClockNsec() % 1_000_000_000L);
                    sm.put("name", s.name());
                    sm.put("date-sec", s.dateSec());
                    sm.put("date-nsec", s.dateNsec());
                    sm.put("vm-clock-sec", s.vmClockNsec() / 1_000_000_000L);
                    sm.put("id", s.id());
                    sm.put("vm-state-size", s.vmStateSize64());
                    snaps.add(sm);
                }
                m.put("snapshots", snaps);
            }
        }
        m.put("virtual-size", d.size());
        m.put("filename", d.name());
        if (d instanceof Qcow2Image q) {
            m.put("cluster-size", q.header().clusterSize());
        }
        m.put("format", d.format());
        m.put("actual-size", d.allocatedBytes());
        if (d instanceof Qcow2Image q) {
            Header h = q.header();
            Map<String, Object> data = new LinkedHashMap<>();
            if (h.version() == 2) {
                data.put("compat", "0.10");
                data.put("compression-type", "zlib");
                data.put("refcount-bits", h.refcountBits());
            } else {
                data.put("compat", "1.1");
                data.put("compression-type", h.compressionType() == Header.COMPRESSION_ZSTD ? "zstd" : "zlib");
                data.put("lazy-refcounts", h.lazyRefcounts());
                data.put("refcount-bits", h.refcountBits());
                if (h.dataFile() != null) {
                    data.put("data-file", h.dataFile());
                }
                if (h.hasDataFile()) {
                    data.put("data-file-raw", h.dataFileRaw());
                }
                data.put("corrupt", h.corrupt());
                data.put("extended-l2", h.extendedL2());
            }
            Map<String, Object> spec = new LinkedHashMap<>();
            spec.put("type", "qcow2");
            spec.put("data", data);
            m.put("format-specific", spec);
            if (h.backingFile() != null) {
                m.put("full-backing-filename", Images.combine(d.name(), h.backingFile()));
                m.put("backing-filename", h.backingFile());
            }
            m.put("dirty-flag", h.dirty());
        } else {
            m.put("dirty-flag", false);
        }
        return m;
    }

    private static void human(PrintStream out, BlockDevice d) throws java.io.IOException {
        out.println("image: " + d.name());
        out.println("file format: " + d.format());
        out.println("virtual size: " + Sizes.human(d.size()) + " (" + d.size() + " bytes)");
        out.println("disk size: " + Sizes.human(d.allocatedBytes()));
        if (d instanceof Qcow2Image q) {
            Header h = q.header();
            out.println("cluster_size: " + h.clusterSize());
            if (h.dirty()) {
                out.println("cleanly shut down: no");
            }
            if (h.backingFile() != null) {
                String full = Images.combine(d.name(), h.backingFile());
                out.println("backing file: " + h.backingFile() + (full.equals(h.backingFile()) ? "" : " (actual path: " + full + ")"));
                if (h.backingFormat() != null) {
                    out.println("backing file format: " + h.backingFormat());
                }
            }
            if (!q.snapshots().isEmpty()) {
                out.println("Snapshot list:");
                snapshotTable(out, q.snapshots());
            }
            out.println("Format specific information:");
            if (h.version() == 2) {
                out.println("    compat: 0.10");
                out.println("    compression type: zlib");
                out.println("    refcount bits: " + h.refcountBits());
            } else {
                out.println("    compat: 1.1");
                out.println("    compression type: " + (h.compressionType() == Header.COMPRESSION_ZSTD ? "zstd" : "zlib"));
                out.println("    lazy refcounts: " + h.lazyRefcounts());
                out.println("    refcount bits: " + h.refcountBits());
                if (h.dataFile() != null) {
                    out.println("    data file: " + h.dataFile());
                }
                if (h.hasDataFile()) {
                    out.println("    data file raw: " + h.dataFileRaw());
                }
                out.println("    corrupt: " + h.corrupt());
                out.println("    extended l2: " + h.extendedL2());
            }
        }
    }

    private static final DateTimeFormatter DATE = DateTimeFormatter.ofPattern("yyyy-MM-dd HH:mm:ss");

    /** bdrv_snapshot_dump's table: header row and one row per snapshot. */
    static void snapshotTable(PrintStream out, List<Snapshot> snaps) {
        out.println(String.format("%-10s%-17s%8s%20s%13s%11s", "ID", "TAG", "VM SIZE", "DATE", "VM CLOCK", "ICOUNT"));
        for (Snapshot s : snaps) {
            String date = DATE.format(Instant.ofEpochSecond(s.dateSec()).atZone(ZoneId.systemDefault()));
            long secs = s.vmClockNsec() / 1_000_000_000L;
            String clock = String.format("%02d:%02d:%02d.%03d", secs / 3600, (secs / 60) % 60, secs % 60,
                    (s.vmClockNsec() / 1_000_000) % 1000);
            String icount = s.icount() >= 0 ? Long.toString(s.icount()) : "";
            out.println(String.format("%-9s %-16s %8s%20s%13s%11s", s.id(), s.name(), Sizes.human(s.vmStateSize64()), date, clock, icount));
        }
    }
}
