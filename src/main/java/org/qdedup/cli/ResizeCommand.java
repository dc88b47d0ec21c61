package org.qdedup.cli;

import java.util.concurrent.Callable;
import org.qdedup.image.BlockDevice;
import org.qdedup.image.ImageOps;
import org.qdedup.image.Images;
import org.qdedup.image.OpenOptions;
import picocli.CommandLine.Command;
import picocli.CommandLine.Option;
import picocli.CommandLine.Parameters;

@Command(name = "resize", description = "Change an image's virtual size: SIZE, +SIZE or -SIZE (as qemu-img resize).")
final class ResizeCommand implements Callable<Integer> {
    @Option(names = "--shrink", description = "Allow shrinking: data past the new end is dropped.")
    boolean shrink;
    @Option(names = "-f", paramLabel = "FMT", description = "Image format.")
    String format;
    @Option(names = "-q", description = "Quiet.")
    boolean quiet;
    @Parameters(index = "0", paramLabel = "IMG")
    String image;
    @Parameters(index = "1", paramLabel = "[+|-]SIZE")
    String size;

    @Override
    public Integer call() throws Exception {
        long current;
        try (BlockDevice d = Images.open(image, new OpenOptions(format, false, null))) {
            current = d.size();
        }
        long target;
        try {
            if (size.startsWith("+")) {
                target = current + Sizes.parse(size.substring(1));
            } else if (size.startsWith("-")) {
                target = current - Sizes.parse(size.substring(1));
            } else {
                target = Sizes.parse(size);
            }
        } catch (IllegalArgumentException e) {
            throw new CliException("Invalid image size specified: " + e.getMessage());
        }
        if (target < 0) {
            throw new CliException("New image size must be positive");
        }
        ImageOps.resize(image, target, shrink);
        if (!quiet) {
            Context.out().println("Image resized.");
        }
        return 0;
    }
}
