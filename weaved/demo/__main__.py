import sys

from weaved.demo.services import main

sys.exit(main())
