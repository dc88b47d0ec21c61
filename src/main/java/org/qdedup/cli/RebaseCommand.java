package org.qdedup.cli;

import java.util.concurrent.Callable;
import org.qdedup.image.ImageOps;
import picocli.CommandLine.Command;
import picocli.CommandLine.Option;
import picocli.CommandLine.Parameters;

@Command(name = "rebase", description = "Change an image's backing file; the guest-visible content stays the same "
        + "unless -u (as qemu-img rebase).")
final class RebaseCommand implements Callable<Integer> {
    @Option(names = "-u", description = "Unsafe: only change the name in the header.")
    boolean unsafe;
    @Option(names = "-b", paramLabel = "BACKING", required = true, description = "New backing file (\"\" for none).")
    String backing;
    @Option(names = "-F", paramLabel = "FMT", description = "New backing file format.")
    String backingFormat;
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
        ImageOps.rebase(image, backing, backingFormat, unsafe);
        return 0;
    }
}
