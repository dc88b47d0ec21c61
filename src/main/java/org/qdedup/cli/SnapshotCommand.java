package org.qdedup.cli;

import java.util.concurrent.Callable;
import org.qdedup.image.BlockDevice;
import org.qdedup.image.Images;
import org.qdedup.image.OpenOptions;
import org.qdedup.image.Qcow2Image;
import picocli.CommandLine.ArgGroup;
import picocli.CommandLine.Command;
import picocli.CommandLine.Option;
import picocli.CommandLine.Parameters;

@Command(name = "snapshot", description = "List (-l), create (-c), apply (-a) or delete (-d) internal snapshots.")
final class SnapshotCommand implements Callable<Integer> {
    static final class Action {
        @Option(names = "-l", description = "List the snapshots.")
        boolean list;
        @Option(names = "-c", paramLabel = "NAME", description = "Create a snapshot.")
        String create;
        @Option(names = "-a", paramLabel = "NAME", description = "Apply (revert to) a snapshot.")
        String apply;
        @Option(names = "-d", paramLabel = "NAME", description = "Delete a snapshot.")
        String delete;
    }

    @ArgGroup(exclusive = true, multiplicity = "1")
    Action action;
    @Option(names = "-f", paramLabel = "FMT", description = "Image format.")
    String format;
    @Option(names = {"-U", "--force-share"}, description = "Open without taking the image lock (with -l).")
    boolean forceShare;
    @Parameters(paramLabel = "IMG")
    String image;

    @Override
    public Integer call() throws Exception {
        if (format != null && !format.equals("qcow2")) {
            throw new CliException(image + ": this image format (" + format + ") does not support snapshots");
        }
        if (action.create != null) {
            org.qdedup.image.Snapshots.create(image, action.create);
            return 0;
        }
        if (action.apply != null) {
            org.qdedup.image.Snapshots.apply(image, action.apply);
            return 0;
        }
        if (action.delete != null) {
            org.qdedup.image.Snapshots.delete(image, action.delete);
            return 0;
        }
        try (BlockDevice dev = Images.open(image, new OpenOptions(format, forceShare, null))) {
            if (!(dev instanceof Qcow2Image q)) {
                throw new CliException(image + ": this image format (" + dev.format() + ") does not support snapshots");
            }
            if (!q.snapshots().isEmpty()) {
                Context.out().println("Snapshot list:");
                InfoCommand.snapshotTable(Context.out(), q.snapshots());
            }
        }
        return 0;
    }
}
