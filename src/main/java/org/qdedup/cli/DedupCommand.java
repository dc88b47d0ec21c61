package org.qdedup.cli;

import java.io.PrintStream;
import java.nio.file.Path;
import java.util.concurrent.Callable;
import org.qdedup.image.ImageOps;
import org.qdedup.image.Images;
import org.qdedup.image.OpenOptions;
import org.qdedup.image.Qcow2Image;
import org.qdedup.image.Qcow2Writer;
import org.qdedup.io.FileBlockFile;
import org.qdedup.ops.Progress;
import picocli.CommandLine.Command;
import picocli.CommandLine.Option;
import picocli.CommandLine.Parameters;

@Command(name = "dedup", description = "Dedup an existing qcow2 image in place and enable dedup on it: clusters of the "
        + "active layer holding the same content are made one, zero clusters become the zero flag, and the freed "
        + "space goes back to the host file system.")
final class DedupCommand implements Callable<Integer> {
    @Option(names = "-p", description = "Show progress on stderr.")
    boolean progress;
    @Parameters(paramLabel = "IMG")
    String image;

    @Override
    public Integer call() throws Exception {
        long allocatedBefore = allocated();
        ImageOps.enableDedup(image);
        Qcow2Writer.InPlaceResult r;
        try (Qcow2Image q = Images.openWritable(image, OpenOptions.defaults().withFormat("qcow2"))) {
            Progress p = progress ? new Progress(Context.err(), q.size()) : Progress.none();
            long[] last = {0};
            r = q.writer().dedupInPlace(bytes -> {
                p.add(bytes - last[0]);
                last[0] = bytes;
            });
            p.finish();
        }
        long allocatedAfter = allocated();
        PrintStream out = Context.out();
        out.printf("%s: %d data clusters examined, %d shared, %d zero clusters released; allocated %d -> %d bytes%n",
                image, r.clustersExamined(), r.clustersShared(), r.zeroClusters(), allocatedBefore, allocatedAfter);
        return 0;
    }

    private long allocated() throws Exception {
        try (FileBlockFile f = FileBlockFile.open(image, Path.of(image), false, FileBlockFile.Lock.NONE)) {
            return f.allocatedBytes();
        }
    }
}
