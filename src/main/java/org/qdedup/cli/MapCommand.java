package org.qdedup.cli;

import java.io.PrintStream;
import java.util.concurrent.Callable;
import org.qdedup.image.BlockDevice;
import org.qdedup.image.ChainStatus;
import org.qdedup.image.Images;
import org.qdedup.image.OpenOptions;
import org.qdedup.io.BlockFile;
import picocli.CommandLine.Command;
import picocli.CommandLine.Option;
import picocli.CommandLine.Parameters;

@Command(name = "map", description = "Show where each guest range lives (as qemu-img map).")
final class MapCommand implements Callable<Integer> {
    @Option(names = "-f", paramLabel = "FMT", description = "Image format (raw or qcow2); probed when omitted.")
    String format;
    @Option(names = {"-U", "--force-share"}, description = "Open without taking the image lock.")
    boolean forceShare;
    @Option(names = "--output", paramLabel = "FMT", defaultValue = "human", description = "human or json.")
    String output;
    @Parameters(paramLabel = "IMG")
    String image;

    /** qemu-img asks for block status in steps of at most 1 GiB. */
    private static final long STEP = 1L << 30;

    @Override
    public Integer call() throws Exception {
        boolean json = OutputFormat.json(output);
        PrintStream out = Context.out();
        StringBuilder sb = new StringBuilder();
        try (BlockDevice dev = Images.open(image, new OpenOptions(format, forceShare, null))) {
            long size = dev.size();
            if (json) {
                sb.append('[');
            } else {
                sb.append(String.format("%-16s%-16s%-16s%s%n", "Offset", "Length", "Mapped to", "File"));
            }
            ChainStatus.Entry cur = null;
            boolean first = true;
            for (long off = 0; off < size; ) {
                ChainStatus.Entry next = ChainStatus.entry(dev, off, Math.min(STEP, size - off));
                off += next.length();
                if (cur != null && ChainStatus.mergeable(cur, next)) {
                    cur = ChainStatus.merge(cur, next);
                    continue;
                }
                if (cur != null) {
                    if (!emit(sb, cur, json, first)) {
                        out.print(sb);
                        throw new CliException("File contains external, encrypted or compressed clusters.");
                    }
                    first = false;
                }
                cur = next;
            }
            if (cur != null && !emit(sb, cur, json, first)) {
                out.print(sb);
                throw new CliException("File contains external, encrypted or compressed clusters.");
            }
            if (json) {
                sb.append("]\n");
            }
        }
        out.print(sb);
        return 0;
    }

    /** Appends one record; false where the human format cannot show it (data without a host offset). */
    private static boolean emit(StringBuilder sb, ChainStatus.Entry e, boolean json, boolean first) {
        if (json) {
            if (!first) {
                sb.append(",\n");
            }
            sb.append("{ \"start\": ").append(e.start()).append(", \"length\": ").append(e.length())
                    .append(", \"depth\": ").append(e.depth()).append(", \"present\": ").append(e.present())
                    .append(", \"zero\": ").append(e.zero()).append(", \"data\": ").append(e.data());
            if (e.hasOffset()) {
                sb.append(", \"offset\": ").append(e.offset());
            }
            sb.append('}');
        } else if (e.data() && !e.hasOffset()) {
            return false;
        } else if (e.data() && !e.zero()) {
            sb.append(String.format("%-16s%-16s%-16s%s%n", hex(e.start()), hex(e.length()), hex(e.offset()),
                    ((BlockFile) e.file()).name()));
        }
        return true;
    }

    /** C's "%#x": 0 stays "0". */
    private static String hex(long v) {
        return v == 0 ? "0" : "0x" + Long.toHexString(v);
    }
}
