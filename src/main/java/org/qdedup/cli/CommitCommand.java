package org.qdedup.cli;

import java.util.concurrent.Callable;
import org.qdedup.image.ImageOps;
import picocli.CommandLine.Command;
import picocli.CommandLine.Option;
import picocli.CommandLine.Parameters;

@Command(name = "commit", description = "Write an image's data into its backing file and empty it (as qemu-img commit).")
final class CommitCommand implements Callable<Integer> {
    @Option(names = "-d", description = "Keep the image's data (do not empty it).")
    boolean keep;
    @Option(names = "-b", paramLabel = "BASE", description = "Commit into this image of the backing chain (implies -d).")
    String base;
    @Option(names = "-f", paramLabel = "FMT", description = "Image format.")
    String format;
    @Option(names = "-q", description = "Quiet.")
    boolean quiet;
    @Option(names = "-p", description = "Progress (accepted).")
    boolean progress;
    @Option(names = "-t", paramLabel = "CACHE", description = "Cache mode (accepted).")
    String cache;
    @Parameters(paramLabel = "IMG")
    String image;

    @Override
    public Integer call() throws Exception {
        ImageOps.commit(image, base, keep);
        if (!quiet) {
            Context.out().println("Image committed.");
        }
        return 0;
    }
}
