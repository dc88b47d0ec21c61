package org.qdedup.cli;

import java.io.PrintStream;
import java.util.concurrent.Callable;
import org.qdedup.image.BlockDevice;
import org.qdedup.image.Images;
import org.qdedup.image.OpenOptions;
import org.qdedup.ops.Compare;
import picocli.CommandLine.Command;
import picocli.CommandLine.Option;
import picocli.CommandLine.Parameters;

@Command(name = "compare", description = "Compare two images' guest-visible contents (as qemu-img compare). "
        + "Exit 0 identical, 1 different, 2 error.")
final class CompareCommand implements Callable<Integer> {
    @Option(names = "-f", paramLabel = "FMT", description = "Format of the first image.")
    String formatA;
    @Option(names = "-F", paramLabel = "FMT", description = "Format of the second image.")
    String formatB;
    @Option(names = {"-U", "--force-share"}, description = "Open without taking the image locks.")
    boolean forceShare;
    @Option(names = "-s", description = "Strict: images of different sizes differ.")
    boolean strict;
    @Option(names = "-p", description = "Show progress (accepted; comparison is quick).")
    boolean progress;
    @Parameters(index = "0", paramLabel = "A")
    String a;
    @Parameters(index = "1", paramLabel = "B")
    String b;

    @Override
    public Integer call() {
        PrintStream out = Context.out();
        try (BlockDevice da = Images.open(a, new OpenOptions(formatA, forceShare, null));
             BlockDevice db = Images.open(b, new OpenOptions(formatB, forceShare, null))) {
            Compare.Result r = Compare.compare(da, db, strict);
            if (r.sizeMismatch() && strict) {
                out.println("Strict mode: Image size mismatch!");
                return 1;
            }
            if (r.sizeMismatch()) {
                out.println("Warning: Image size mismatch!");
            }
            if (r.identical()) {
                out.println("Images are identical.");
                return 0;
            }
            out.println("Content mismatch at offset " + r.mismatchOffset() + "!");
            return 1;
        } catch (Exception e) {
            Context.err().println("qdedup: " + Main.describe(e));
            return 2;
        }
    }
}
